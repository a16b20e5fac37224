"""LLM judges of wrong answers: pairwise ("which output is better?") and score (0-5 in fives).

Prompts are the paper's (``prompts/judge_pairwise.txt``, ``prompts/judge_score.txt``); the judge
sees ``task.judge_query(question)`` as the instruction (for multiple choice: the question without
its options, as in the paper's code, since every sample saw the options in its own order).

Two modes:
- ``text``: the judge writes its reasoning and a verdict (greedy), which a parser reads with an
  explicit parse status; calls go through the run's call cache (``CachedLLM``).
- ``logprob``: no generation; the verdict is read from the next-token log-probabilities after a
  forced prefix (``choice_logprobs``). Cheap, never unparsable; cached in the output file only.

Records go to ``judgments/<generator>/<judge>/<task>.{pairwise,score}.jsonl`` with a manifest
holding the parameters of every (task, kind) in that folder; log-prob judgments use the folder
``<judge>-logprob`` (``judge_folder``) so that both modes of one judge can coexist.
"""
from __future__ import annotations

import json
import logging
import math
import random
import re
import unicodedata
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import paths, store
from .elicit import Pair, is_swap_consistent, wow_pairs
from .llm.base import Completion, Decoding, Request
from .tasks import Question, Task, get_task

log = logging.getLogger(__name__)

PAIRWISE_PREFIX = "Preferred output:"
PAIRWISE_CHOICES = (" 1", " 2")
SCORE_CHOICES = tuple(f" {d}" for d in range(6))
BATCH = 5                                   # responses per score-judge prompt (the paper's template)
MAX_NEW_TOKENS = 256                        # pairwise replies (the official code's budget; < 100 words asked)
SCORE_MAX_NEW_TOKENS = 1024                 # score replies: five reasonings (the official code's budget)


# ---------------------------------------------------------------------------- prompts

def fill(template: str, values: Mapping[str, str]) -> str:
    """Replace ``{name}`` placeholders in one pass: text that itself contains braces (code,
    sets, a literal "{output_2}") is inserted verbatim, never re-substituted or formatted."""
    missing = set(re.findall(r"\{(\w+)\}", template)) - set(values)
    if missing:
        raise KeyError(f"template placeholders without a value: {sorted(missing)}")
    return re.sub(r"\{(\w+)\}", lambda m: str(values[m.group(1)]), template)


def pairwise_prompt(instruction: str, output_1: str, output_2: str) -> str:
    return fill(paths.prompt_text("judge_pairwise"),
                {"instruction": instruction, "output_1": output_1, "output_2": output_2})


def score_prompt(instruction: str, responses: Sequence[str]) -> str:
    if len(responses) != BATCH:
        raise ValueError(f"the score prompt takes exactly {BATCH} responses, got {len(responses)}")
    values = {"instruction": instruction, **{f"response_{k + 1}": r for k, r in enumerate(responses)}}
    return fill(paths.prompt_text("judge_score"), values)


def question_index(task: Task, samples: Sequence[dict]) -> dict[str, Question]:
    """{question_id: Question} for the questions of ``task`` in ``samples``, looked up in the
    splits the samples name (only those questions are materialised)."""
    rows = [r for r in samples if r["task"] == task.name]
    wanted = {str(r["question_id"]) for r in rows}
    found: dict[str, Question] = {}
    for split in sorted({r["split"] for r in rows}):
        items = [q for q in task.splits()[split] if q.qid in wanted and q.qid not in found]
        found.update({q.qid: q for q in task.materialise(items)})
    if missing := sorted(wanted - set(found)):
        raise KeyError(f"task {task.name}: {len(missing)} question ids of the samples are not in its splits "
                       f"(first: {missing[:3]}); were the samples drawn with other task options?")
    return found


# ---------------------------------------------------------------------------- parsers
#
# The two text-mode parsers read a judge's reply with an explicit status and never guess: a reply
# that names two verdicts, or scores a response twice, is unparsed with the reason, not graded.
# They run in linear time on any input (a judge reply is untrusted text): every pattern below has
# bounded quantifiers or is a single character class with nothing after it, the text after a label
# is read from a window of at most CLAUSE_CHARS characters on its line, and the pairwise verdict is
# read once, after the last label. Both parsers NFKC-normalise the reply first, so full-width
# digits and colons ("Score：４") read as ASCII; a digit of another script is no number.

_VERDICT = re.compile(r"\bpreferred\s{1,10}output[\s*_]{0,10}:", re.IGNORECASE)     # the verdict label
_SCORE = re.compile(r"\bscore[\s*_]{0,10}:", re.IGNORECASE)                         # a score label
# "Response k" heading a line ("Response 3:", "**Response 3**:", "### Response 3", "Response 3 -
# Score: 4"); "Response 1 is better" in prose is no heading.
_RESPONSE = re.compile(r"^[ \t>#*_-]{0,20}response[ \t]{0,5}#?(\d{1,3})"
                       r"(?=[ \t*_)\]]{0,10}(?:[:.\-\u2013\u2014]|score|$))",
                       re.IGNORECASE | re.MULTILINE | re.ASCII)
_SKIP = re.compile(r"[\s*_`'\"(\[]*")             # whitespace and markup between a label and its value
_OUTPUT_WORD = re.compile(r"output[\s*_#]{0,10}", re.IGNORECASE)
_VERDICT_NUMBER = re.compile(r"\d+(?:\.\d+)?", re.ASCII)
_SCORE_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?", re.ASCII)
_OUT_OF = re.compile(r"[ \t]{0,5}(?:/|out[ \t]{1,5}of)[ \t]{0,5}(\d+(?:\.\d+)?)", re.IGNORECASE | re.ASCII)
# A sentence break ends a verdict or score clause, unless a number follows it ("1. 2", "1 (2)").
_BREAK = re.compile(r"[.!?;(\[](?![\s*_]{0,10}\d)")
_ECHO = re.compile(r"[\s*_'\"`]{0,10}or[\s*_'\"`]{1,10}2[\s*_'\"`.)]{0,10}", re.IGNORECASE)   # the template's "1 or 2"
CLAUSE_CHARS = 200


def _reply_text(text: str) -> str:
    return unicodedata.normalize("NFKC", text).replace("\r\n", "\n").replace("\r", "\n")


def _clause(text: str, start: int) -> str:
    """The text from ``start`` to the end of its line, at most CLAUSE_CHARS characters."""
    end = text.find("\n", start, start + CLAUSE_CHARS)
    return text[start:end] if end >= 0 else text[start:start + CLAUSE_CHARS]


def _names_another_number(rest: str) -> bool:
    """Whether ``rest`` (what follows a verdict or score on its line) names another number before
    its first sentence break: "1, 2", "1 & 2", "2, then 1", "3-4", "3 or 4" do; "2. (Output 2 is
    closer)" and "4 (out of 5)" do not."""
    cut = _BREAK.search(rest)
    head = rest[:cut.start()] if cut else rest
    return any(ch.isdigit() for ch in head)


def parse_pairwise(text: str | None) -> tuple[int | None, str]:
    """(verdict 1|2, "ok") from the reply's LAST "Preferred output:" label (the template asks for
    the verdict in the last line; reasoning may quote the label before it), else (None, status).

    Accepted: markdown bold or quotes around the label and the number ("**Preferred output:**
    **1**"), the word "Output" ("Preferred output: Output 2"), the number on the next line, and
    an explanation after a sentence break ("2. (Output 2 gets more blanks right.)").
    Statuses:
    - "missing": no "Preferred output:" label, or nothing after the last one (a reply cut off);
    - "invalid": the last label is followed by no number ("Output A", "neither"), by a number
      other than 1 and 2 (3, 12, a decimal such as 1.5), or by the template's own "1 or 2";
    - "ambiguous": the verdict names a second number before its first sentence break: "1 2",
      "1, 2", "1 & 2", "1 and 2", "2, then 1", "1 (2)". A trailing explanation that cites a
      number without a break first ("2 because output 1 ...") is ambiguous too: unparsed, never
      guessed.
    A label in the reasoning AFTER the verdict wins, as the last one."""
    if not text:
        return None, "missing"
    text = _reply_text(text)
    last = None
    for last in _VERDICT.finditer(text):
        pass
    if last is None:
        return None, "missing"
    start = _SKIP.match(text, last.end()).end()
    if start == len(text):
        return None, "missing"
    clause = _clause(text, start)
    word = _OUTPUT_WORD.match(clause)
    number = _VERDICT_NUMBER.match(clause, word.end() if word else 0)
    if number is None:
        return None, "invalid"
    rest = clause[number.end():]
    if number.group() not in ("1", "2") or (number.group() == "1" and _ECHO.fullmatch(rest)):
        return None, "invalid"
    if _names_another_number(rest):
        return None, "ambiguous"
    return int(number.group()), "ok"


def _read_score(clause: str) -> tuple[int | None, str] | None:
    """The score at the start of ``clause`` (what follows a "Score:" label) as (value, "ok") or
    (None, reason); None when the clause does not start with a number ("<rating>", "N/A")."""
    number = _SCORE_NUMBER.match(clause)
    if number is None:
        return None
    value = float(number.group())
    rest = clause[number.end():]
    scale = _OUT_OF.match(rest)
    if scale:
        rest = rest[scale.end():]
    if _names_another_number(rest):
        return None, "ambiguous"
    if (scale and float(scale.group(1)) != 5) or not value.is_integer() or not 0 <= value <= 5:
        return None, "out_of_range"
    return int(value), "ok"


def parse_scores(text: str | None, n: int = BATCH) -> tuple[list[int] | None, str]:
    """(n scores, "ok") from the reply's "Score: <0-5>" lines, response 1 first; otherwise (None,
    status). A batch that does not parse cleanly is never guessed.

    A score is the integer after a "Score:" label (markdown bold and quotes allowed around both;
    "3.0" reads as 3; "4/5" and "4 out of 5" as 4, the template's scale made explicit); a label
    followed by no number ("Score: <rating>", "Score: N/A") is no score. The template asks for
    reasoning per response, each followed by a "Score:" line, so a score belongs to the response
    whose "Response k" heading (a line starting with it) comes first after the previous score.
    - No score has a heading: the scores are read in order; "missing" with fewer than n,
      "extra" with more.
    - Every score has one: they are attributed by heading, so out-of-order responses are read
      correctly; "mislabeled" for a heading outside 1..n, "duplicate" when a response is scored
      twice (even with the same value: the reply is not clean), "missing" when one is not scored.
    - Some have one ("Response 1: ... Response 5:" reasoning, then five "Score:" lines): the
      scores are read in order ("missing"/"extra" as above), and every heading must agree with
      its score's position, else "mislabeled" (the scores cannot be attributed).
    Then each score, in response order: "ambiguous" when a second number follows it before a
    sentence break ("Score: 3-4", "Score: 3 or 4"), "out_of_range" when it is not an integer 0..5
    (6, -1, 2.5, or "8/10", another scale)."""
    if not text:
        return None, "missing"
    text = _reply_text(text)
    headings = [(m.start(), int(m.group(1))) for m in _RESPONSE.finditer(text)]
    found: list[tuple[int | None, tuple[int | None, str]]] = []     # (heading, (value, status))
    h, block_start = 0, 0
    for label in _SCORE.finditer(text):
        score = _read_score(_clause(text, _SKIP.match(text, label.end()).end()))
        if score is None:
            continue
        while h < len(headings) and headings[h][0] < block_start:
            h += 1
        heading = headings[h][1] if h < len(headings) and headings[h][0] < label.start() else None
        found.append((heading, score))
        block_start = label.end()
    labels = [heading for heading, _ in found]
    if all(k is not None for k in labels) and labels:
        if any(not 1 <= k <= n for k in labels):
            return None, "mislabeled"
        if len(set(labels)) < len(labels):
            return None, "duplicate"
        if len(labels) < n:
            return None, "missing"
        ordered = [score for _, score in sorted(found, key=lambda item: item[0])]
    else:
        if len(found) < n:
            return None, "missing"
        if len(found) > n:
            return None, "extra"
        if any(k is not None and k != position for position, k in enumerate(labels, start=1)):
            return None, "mislabeled"
        ordered = [score for _, score in found]
    for value, status in ordered:
        if status != "ok":
            return None, status
    return [value for value, _ in ordered], "ok"


# ---------------------------------------------------------------------------- shared plumbing

def _backend(llm):
    """The backend behind ``llm`` (which may be a CachedLLM): log-prob calls go to it directly."""
    from .llm.cache import CachedLLM
    return llm.llm if isinstance(llm, CachedLLM) else llm


def _cached(llm, run: store.Run):
    """``llm`` behind the run's call cache (as given if it already is a CachedLLM)."""
    from .llm.cache import CachedLLM
    return llm if isinstance(llm, CachedLLM) else CachedLLM(llm, run.root / "cache")


def _choice_logprobs(backend, judge_name: str, prompts: list[str], prefix: str | Sequence[str],
                     choices: Sequence[str]) -> list[dict[str, float]]:
    """Next-token log-probs of ``choices`` (" 1", " 2", ...) after ``prefix`` (one, or one per
    prompt). Tokenizers that split a digit from its leading space (SmolLM2, Llama 3) get the space
    in the prefix instead; the returned keys are always ``choices``."""
    chats = [[{"role": "user", "content": p}] for p in prompts]
    try:
        return backend.choice_logprobs(chats, prefix=prefix, choices=list(choices))
    except ValueError as err:
        first_error = err
    if all(c.startswith(" ") for c in choices):
        spaced = prefix + " " if isinstance(prefix, str) else [x + " " for x in prefix]
        try:
            lps = backend.choice_logprobs(chats, prefix=spaced, choices=[c[1:] for c in choices])
            return [{c: lp[c[1:]] for c in choices} for lp in lps]
        except ValueError:
            pass
    shown = prefix if isinstance(prefix, str) else (prefix[0] if prefix else "")
    raise ValueError(f"judge {judge_name}: log-prob mode needs each of {list(choices)} to be one token "
                     f"after the prefix {shown!r} (or without its space after {shown + ' '!r}); use "
                     f"mode='text' for this model ({first_error})") from first_error


def _normalised(params: dict) -> dict:
    return json.loads(json.dumps(params, sort_keys=True, default=str))


def _manifest_entry(path) -> tuple[dict, dict]:
    manifest = path.parent / "manifest.json"
    if not manifest.exists():
        return {}, {}
    data = store.read_json(manifest)
    return data.get("params", {}), data.get("outputs", {})


def _is_complete(path, key: str, params: dict) -> bool:
    """The output file exists, unchanged since it was written with exactly these parameters."""
    if not path.exists():
        return False
    entries, outputs = _manifest_entry(path)
    entry = entries.get(key, {})
    return entry.get("params") == _normalised(params) and outputs.get(path.name) == store.file_sha256(path)


def _save(path, key: str, records: list[dict], params: dict, stats: dict, judge_key: str) -> None:
    """Write the records and update the folder's manifest (other tasks' entries are kept)."""
    store.write_jsonl(path, records)
    entries, _ = _manifest_entry(path)
    entries[key] = {"params": _normalised(params), "stats": stats}
    store.write_manifest(path.parent, "judge", entries, {"judge": judge_key},
                         outputs=sorted(path.parent.glob("*.jsonl")))


def _text_fields(completion: Completion, parse) -> tuple[Any, str, str | None]:
    """(parsed value, status, error) of a text-mode reply; a failed call is "error", never a verdict."""
    if completion.status != "ok":
        return None, "error", completion.error
    value, status = parse(completion.text)
    return value, status, None


def _lp_verdict(lp: dict[str, float]) -> tuple[int | None, str]:
    one, two = lp[PAIRWISE_CHOICES[0]], lp[PAIRWISE_CHOICES[1]]
    if one == two:
        return None, "tie"
    return (1 if one > two else 2), "ok"


def judge_folder(judge_name: str, mode: str) -> str:
    """The judge's folder name under judgments/<generator>/: one per mode (a judge given by path
    or hub id is filed under its label, ``store.model_folder``)."""
    judge_name = store.model_folder(judge_name)
    return judge_name if mode == "text" else f"{judge_name}-{mode}"


def _samples_of(samples: Sequence[dict], task_name: str, generator: str) -> dict[tuple[str, int], dict]:
    return {(str(r["question_id"]), int(r["sample_idx"])): r for r in samples
            if r["task"] == task_name and r["generator"] == generator}


@dataclass(frozen=True)
class JudgePlan:
    """One (generator, judge, task, kind, mode) judging job before any call. Its units (pairs, or
    score batches) are in output order, grouped by question (``question_ids``: one per unit), and
    ``judge(indices)`` returns the records of those units in that order: a range of questions can
    be judged on its own (``shard.run_judging_shard``) and the records concatenated."""

    kind: str
    mode: str
    generator: str
    judge_name: str
    task: str
    path: Path
    params: dict
    judge_key: str
    question_ids: list[str]
    judge: Callable[[Sequence[int]], list[dict]]
    leftover: int = 0                       # score judge: responses left out of the batches (a remainder < 5)


def run_plan(plan: JudgePlan) -> list[dict]:
    """Judge every unit of ``plan``, write its file and manifest entry, return the records.
    Log-prob judgments complete for these parameters are read back instead; text mode always
    reruns through the call cache (which also retries failed calls)."""
    if plan.mode == "logprob" and _is_complete(plan.path, _entry_key(plan.path), plan.params):
        log.info("%s: complete for these parameters, reusing it", plan.path)
        return store.read_jsonl(plan.path)
    recorded = _manifest_entry(plan.path)[0].get(_entry_key(plan.path), {}).get("params")
    store.refuse_overwrite(plan.path, recorded, plan.params, ignore=("prompts",))   # new answers: not a setting
    records = plan.judge(range(len(plan.question_ids)))
    write_judgments(plan.path, records, plan.params, plan.judge_key, plan.leftover)
    return records


def write_judgments(path: Path, records: list[dict], params: dict, judge_key: str, leftover: int = 0) -> dict:
    """Write a judgments file (``<task>.<kind>.jsonl``) and its manifest entry; returns its stats."""
    kind = params["kind"]
    if kind == "pairwise":
        stats = {"pairs": len(records), "statuses": _count(r["status"] for r in records),
                 "swap_consistent": sum(map(is_swap_consistent, records))}
    else:
        stats = {"batches": len(records), "scored": BATCH * len(records), "leftover_unscored": leftover,
                 "statuses": _count(r["status"] for r in records)}
        if not records and leftover:
            log.warning("%s: no question has %d responses, so nothing was scored (sample n_samples >= %d)",
                        path, BATCH, BATCH)
        elif leftover:
            log.warning("%s: %d responses left over from batches of %d (not scored; use n_samples divisible by %d)",
                        path, leftover, BATCH, BATCH)
    _save(path, _entry_key(path), records, params, stats, judge_key)
    log.info("%s (%s): %s", path, params["mode"], stats)
    return stats


def _entry_key(path: Path) -> str:
    """The manifest entry of a judgments file: ``kc.pairwise`` for ``kc.pairwise.jsonl``."""
    return path.name.removesuffix(".jsonl")


def _check_mode(mode: str) -> None:
    if mode not in ("text", "logprob"):
        raise ValueError(f"mode must be 'text' or 'logprob', got {mode!r}")


# ---------------------------------------------------------------------------- pairwise judge

def cap_pairs(pairs: Sequence[Pair], cap: int | None, seed: int = 0) -> list[Pair]:
    """At most ``cap`` pairs, a seeded random subset kept in its original order (the paper
    judged at most 10,000 pairs per setting)."""
    pairs = list(pairs)
    if cap is None or len(pairs) <= cap:
        return pairs
    keep = sorted(random.Random(seed).sample(range(len(pairs)), cap))
    return [pairs[k] for k in keep]


def judge_pairwise(llm, run: store.Run, generator: str, judge_name: str, task_name: str,
                   samples: Sequence[dict], pairs: Sequence[Pair] | None = None, mode: str = "text",
                   swap: bool = True, cap: int | None = None, seed: int = 0,
                   max_new_tokens: int = MAX_NEW_TOKENS,
                   questions: Mapping[str, Question] | None = None) -> list[dict]:
    """Ask the judge about every WoW pair of (generator, task) (``cap`` at most, seeded), with
    sample ``i`` as output 1 and ``j`` as output 2, and again swapped when ``swap``.

    ``swapped_verdict`` is in the swapped prompt's positions (1 = sample j), so a consistent judge
    has ``swapped_verdict == 3 - verdict``. Writes ``run.judgments(generator, judge, task,
    "pairwise")`` (judge folder per ``judge_folder``) and returns the records.
    """
    return run_plan(pairwise_plan(llm, run, generator, judge_name, task_name, samples, pairs, mode, swap, cap,
                                  seed, max_new_tokens, questions))


def pairwise_plan(llm, run: store.Run, generator: str, judge_name: str, task_name: str,
                  samples: Sequence[dict], pairs: Sequence[Pair] | None = None, mode: str = "text",
                  swap: bool = True, cap: int | None = None, seed: int = 0,
                  max_new_tokens: int = MAX_NEW_TOKENS,
                  questions: Mapping[str, Question] | None = None) -> JudgePlan:
    """``judge_pairwise`` before any call: the pairs kept after the cap (wow_pairs order, so grouped
    by question), their prompts and the parameters of the output file."""
    _check_mode(mode)
    by_sample = _samples_of(samples, task_name, generator)
    if pairs is None:
        pairs = wow_pairs(by_sample.values())
    pairs = cap_pairs([p for p in pairs if p.task == task_name and p.generator == generator], cap, seed)
    task = get_task(task_name)
    questions = questions if questions is not None else question_index(task, list(by_sample.values()))
    prompts, swapped = [], []
    for p in pairs:
        instruction = task.judge_query(questions[p.question_id])
        out_i, out_j = by_sample[(p.question_id, p.i)]["response"], by_sample[(p.question_id, p.j)]["response"]
        prompts.append(pairwise_prompt(instruction, out_i, out_j))
        swapped.append(pairwise_prompt(instruction, out_j, out_i))
    backend = _backend(llm)
    params = {"kind": "pairwise", "mode": mode, "swap": swap, "cap": cap, "seed": seed, "judge_key": backend.key,
              "max_new_tokens": max_new_tokens if mode == "text" else None,
              "prompts": store.content_hash(prompts + (swapped if swap else []))}

    def judge(indices: Sequence[int]) -> list[dict]:
        chosen = [pairs[k] for k in indices]
        asked = [prompts[k] for k in indices] + ([swapped[k] for k in indices] if swap else [])
        return _pairwise_records(llm, run, judge_name, mode, swap, max_new_tokens, chosen, asked)

    path = run.judgments(generator, judge_folder(judge_name, mode), task_name, "pairwise")
    return JudgePlan("pairwise", mode, generator, judge_name, task_name, path, params, backend.key,
                     question_ids=[p.question_id for p in pairs], judge=judge)


def _pairwise_records(llm, run: store.Run, judge_name: str, mode: str, swap: bool, max_new_tokens: int,
                      pairs: Sequence[Pair], all_prompts: Sequence[str]) -> list[dict]:
    """The records of ``pairs``; ``all_prompts``: their prompts, then (``swap``) the swapped ones."""
    task_name = pairs[0].task if pairs else ""
    records = [{"task": p.task, "question_id": p.question_id, "generator": p.generator, "judge": judge_name,
                "mode": mode, "i": p.i, "j": p.j, "proxy_i": p.proxy_i, "proxy_j": p.proxy_j}
               for p in pairs]
    if mode == "text":
        decoding = Decoding(temperature=0.0, max_new_tokens=max_new_tokens)
        requests = [Request.chat([{"role": "user", "content": t}], decoding) for t in all_prompts]
        done = _cached(llm, run).generate(requests, desc=f"judging {task_name} pairs") if requests else []
        for k, rec in enumerate(records):
            verdict, status, error = _text_fields(done[k], parse_pairwise)
            rec.update(text=done[k].text, verdict=verdict, status=status, error=error)
            if swap:
                c = done[len(records) + k]
                s_verdict, s_status, s_error = _text_fields(c, parse_pairwise)
                rec.update(swapped_text=c.text, swapped_verdict=s_verdict, swapped_status=s_status,
                           swapped_error=s_error)
    else:
        lps = _choice_logprobs(_backend(llm), judge_name, list(all_prompts), PAIRWISE_PREFIX, PAIRWISE_CHOICES) \
            if all_prompts else []
        for k, rec in enumerate(records):
            verdict, status = _lp_verdict(lps[k])
            rec.update(text=None, verdict=verdict, status=status, logprob_1=lps[k][" 1"], logprob_2=lps[k][" 2"])
            if swap:
                lp = lps[len(records) + k]
                s_verdict, s_status = _lp_verdict(lp)
                rec.update(swapped_text=None, swapped_verdict=s_verdict, swapped_status=s_status,
                           swapped_logprob_1=lp[" 1"], swapped_logprob_2=lp[" 2"])
    for rec in records:
        if not swap:
            rec.update(swapped_text=None, swapped_verdict=None, swapped_status=None)
    return records


def _count(values) -> dict[str, int]:
    counts: dict[str, int] = defaultdict(int)
    for v in values:
        counts[str(v)] += 1
    return dict(sorted(counts.items()))


# ---------------------------------------------------------------------------- score judge

def score_batches(samples: Sequence[dict], seed: int = 0, size: int = BATCH) -> tuple[list[list[dict]], int]:
    """Per question, ALL its samples (parsed or not, as the official code scores every response)
    in sample order, cut into fixed batches of ``size``: samples 0-4, 5-9, ... A remainder of
    fewer than ``size`` is not scored (the template takes exactly five). Returns (batches,
    n_leftover). ``seed`` is kept for the manifest's parameters; the batches do not depend on it."""
    groups: dict[tuple[str, str, str], list[dict]] = defaultdict(list)
    for r in samples:
        groups[(r["task"], r["generator"], str(r["question_id"]))].append(r)
    batches, leftover = [], 0
    for _, rows in sorted(groups.items()):
        rows.sort(key=lambda r: int(r["sample_idx"]))
        full = len(rows) // size * size
        batches += [rows[k:k + size] for k in range(0, full, size)]
        leftover += len(rows) - full
    return batches, leftover


def expected_score(lp: Mapping[str, float]) -> float:
    """sum_d d * p(d) with p renormalised over the digits 0..5."""
    values = [lp[c] for c in SCORE_CHOICES]
    top = max(values)
    weights = [math.exp(v - top) for v in values]
    return sum(d * w for d, w in enumerate(weights)) / sum(weights)


def judge_scores(llm, run: store.Run, generator: str, judge_name: str, task_name: str,
                 samples: Sequence[dict], mode: str = "text", seed: int = 0,
                 max_new_tokens: int = SCORE_MAX_NEW_TOKENS,
                 questions: Mapping[str, Question] | None = None) -> list[dict]:
    """Grade every valid response of (generator, task) 0-5, five per prompt (``score_batches``).

    Text mode parses five "Score: n" lines (``parse_scores``). Log-prob mode asks nothing: for
    response k it forces the assistant turn to start with "Response k:\\nScore:" after the same
    five-response prompt and takes the expected score over the digits " 0".." 5" (a float),
    skipping the reasoning the text mode would write first. Writes ``run.judgments(generator,
    judge_folder(judge, mode), task, "score")`` and returns one record per batch.
    """
    return run_plan(score_plan(llm, run, generator, judge_name, task_name, samples, mode, seed, max_new_tokens,
                               questions))


def score_plan(llm, run: store.Run, generator: str, judge_name: str, task_name: str,
               samples: Sequence[dict], mode: str = "text", seed: int = 0,
               max_new_tokens: int = SCORE_MAX_NEW_TOKENS,
               questions: Mapping[str, Question] | None = None) -> JudgePlan:
    """``judge_scores`` before any call: the batches (per question, in question order), their
    prompts and the parameters of the output file."""
    _check_mode(mode)
    rows = [r for r in samples if r["task"] == task_name and r["generator"] == generator]
    batches, leftover = score_batches(rows, seed)
    task = get_task(task_name)
    questions = questions if questions is not None else question_index(task, rows)
    prompts = [score_prompt(task.judge_query(questions[str(b[0]["question_id"])]), [r["response"] for r in b])
               for b in batches]
    backend = _backend(llm)
    params = {"kind": "score", "mode": mode, "seed": seed, "judge_key": backend.key,
              "max_new_tokens": max_new_tokens if mode == "text" else None, "prompts": store.content_hash(prompts)}

    def judge(indices: Sequence[int]) -> list[dict]:
        return _score_records(llm, run, judge_name, mode, max_new_tokens, [batches[k] for k in indices],
                              [prompts[k] for k in indices])

    path = run.judgments(generator, judge_folder(judge_name, mode), task_name, "score")
    return JudgePlan("score", mode, generator, judge_name, task_name, path, params, backend.key,
                     question_ids=[str(b[0]["question_id"]) for b in batches], judge=judge, leftover=leftover)


def _score_records(llm, run: store.Run, judge_name: str, mode: str, max_new_tokens: int,
                   batches: Sequence[list[dict]], prompts: Sequence[str]) -> list[dict]:
    """One record per batch of responses (``prompts``: one per batch)."""
    task_name = batches[0][0]["task"] if batches else ""
    records = [{"task": b[0]["task"], "question_id": str(b[0]["question_id"]), "generator": b[0]["generator"],
                "judge": judge_name, "mode": mode, "samples": [int(r["sample_idx"]) for r in b],
                "proxies": [r["proxy"] for r in b]} for b in batches]
    if mode == "text":
        decoding = Decoding(temperature=0.0, max_new_tokens=max_new_tokens)
        requests = [Request.chat([{"role": "user", "content": p}], decoding) for p in prompts]
        done = _cached(llm, run).generate(requests, desc=f"judging {task_name} scores") if requests else []
        for rec, c in zip(records, done):
            scores, status, error = _text_fields(c, parse_scores)
            rec.update(text=c.text, scores=scores, status=status, error=error)
    else:
        # one call for all (prompt, k): the five reads of one prompt share its prefill
        pairs = [(p, k) for p in prompts for k in range(1, BATCH + 1)]
        flat = _choice_logprobs(_backend(llm), judge_name, [p for p, _ in pairs],
                                [f"Response {k}:\nScore:" for _, k in pairs], SCORE_CHOICES) if pairs else []
        for b, rec in enumerate(records):
            lps = flat[b * BATCH:(b + 1) * BATCH]
            rec.update(text=None, scores=[expected_score(lp) for lp in lps], status="ok",
                       score_logprobs=[[lp[c] for c in SCORE_CHOICES] for lp in lps])
    return records


def load_judgments(run: store.Run, kind: str) -> list[dict]:
    """Every judgment record of one kind ("pairwise" | "score") in the run, all generators,
    judges, modes and tasks (the input of ``elicit.elicitation_rows``)."""
    if kind not in ("pairwise", "score"):
        raise ValueError(f"judgment kind must be 'pairwise' or 'score', got {kind!r}")
    return [r for path in sorted((run.root / "judgments").glob(f"*/*/*.{kind}.jsonl"))
            for r in store.read_jsonl(path)]


# ---------------------------------------------------------------------------- the stage

@store.stage_writer("judge")
def run_judging(run: store.Run, generators: Sequence[str], judges: Sequence[str], tasks: Sequence[str],
                pairwise_modes: Sequence[str] = ("logprob", "text"), score_modes: Sequence[str] = ("text",),
                caps: Mapping[str, int | None] | None = None, seed: int = 0,
                max_new_tokens: int = MAX_NEW_TOKENS, load: Callable[[str], Any] | None = None,
                score_max_new_tokens: int = SCORE_MAX_NEW_TOKENS) -> list[dict]:
    """Every judge x every generator's answers x every task, in the requested modes (the
    generator x judge cross of the paper). ``caps[mode]`` bounds the pairs judged per (generator,
    judge, task) in that mode, like the paper's 10,000. ``max_new_tokens`` / ``score_max_new_tokens``:
    text-mode reply budgets of the pairwise and score judges (the official code: 256, 1024).
    ``load(judge_name)``: the judge (default ``load_llm``). Returns one summary row per call."""
    return [summary_row(plan, run_plan(plan))
            for plan in judging_plans(run, generators, judges, tasks, pairwise_modes, score_modes, caps, seed,
                                      max_new_tokens, load, score_max_new_tokens)]


def judging_plans(run: store.Run, generators: Sequence[str], judges: Sequence[str], tasks: Sequence[str],
                  pairwise_modes: Sequence[str] = ("logprob", "text"), score_modes: Sequence[str] = ("text",),
                  caps: Mapping[str, int | None] | None = None, seed: int = 0,
                  max_new_tokens: int = MAX_NEW_TOKENS, load: Callable[[str], Any] | None = None,
                  score_max_new_tokens: int = SCORE_MAX_NEW_TOKENS) -> Iterator[JudgePlan]:
    """The jobs of ``run_judging`` in its order, planned lazily (one judge model loaded at a time).
    ``load(judge_name)``: the judge (default ``load_llm``; a sharded run passes its own cache)."""
    from .llm.models import load_llm
    from .sample import load_samples
    caps = dict(caps or {})
    from .llm.models import model_label
    for judge_id in judges:
        judge, judge_name = (load or load_llm)(judge_id), model_label(judge_id)    # a path or hub id: its label
        for generator in generators:
            for task_name in tasks:
                samples = load_samples(run, generator, task_name)
                for mode in pairwise_modes:
                    yield pairwise_plan(judge, run, generator, judge_name, task_name, samples, mode=mode,
                                        cap=caps.get(mode), seed=seed, max_new_tokens=max_new_tokens)
                for mode in score_modes:
                    yield score_plan(judge, run, generator, judge_name, task_name, samples, mode=mode, seed=seed,
                                     max_new_tokens=score_max_new_tokens)


def summary_row(plan: JudgePlan, records: Sequence[dict]) -> dict:
    statuses = _count(r["status"] for r in records)
    return {"kind": plan.kind, "mode": plan.mode, "judge": plan.judge_name, "generator": plan.generator,
            "task": plan.task, "calls": len(records), "ok": statuses.get("ok", 0),
            "unparsed": sum(v for k, v in statuses.items() if k not in ("ok", "error")),
            "errors": statuses.get("error", 0)}
