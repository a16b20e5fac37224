"""Phase 1: sample N answers per question, extract the final answer, grade it.

The paper's protocol: a chain-of-thought prompt, N samples at temperature 1.0 (for multiple
choice each sample sees the options in its own random order); then the same model is asked
again, in a second user turn, for the final answer only, with the official task instruction
("... start your answer with 'The total weight is'"); the answer is mapped back to the ORIGINAL
option order and graded by the task's proxy.

Two extraction modes (``SampleConfig.extraction``):
- ``text`` (the paper's): the model replies freely (greedy, 32 tokens) and a parser reads only the
  phrase the instruction asked for (``tasks.base.Parsed``: rules ``letter``, ``phrase``, ``bare``);
  anything else is ``unparsed``, never a number picked out of free text;
- ``constrained`` (for small models that do not follow the format): the reply is prefilled with
  the instruction's opening and continued only with option letters or digits
  (``wowlib.llm.constrain``): the model's own decision after its reasoning, rule ``constrained``.

The same function answers the test split for evaluation (``wowlib.evaluate``), with an aligned
model in place of the original.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

from . import store
from .llm.base import Completion, Decoding, Request
from .tasks import Question, Task, get_task

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SampleConfig:
    """Knobs of Phase 1 sampling (paper values in comments)."""

    generator: str = "smollm2-135m"
    tasks: tuple[str, ...] = ("kc", "nlgraph_shortest_path")
    split: str = "train"
    n_questions: int | None = 20          # per task; paper: all of D_train (~500)
    n_samples: int = 10                   # paper: 10
    temperature: float = 1.0              # paper: 1.0
    max_new_tokens: int = 256             # paper: 1024 (the responses are "concise")
    extract_max_new_tokens: int = 32      # paper: 32, greedy (text mode)
    seed: int = 0
    task_options: dict[str, dict] = field(default_factory=dict)   # e.g. {"chess": {"depth": 12}}
    stop_on_repeat: bool = False          # stop a reply that loops (llm.base.Decoding); the paper: off
    extraction: str = "text"              # "text" (the paper's) | "constrained" (module docstring)
    extraction_fallback: bool = False     # constrained on a backend that cannot (an API): text mode

    def __post_init__(self) -> None:
        if self.n_samples < 1 or (self.n_questions is not None and self.n_questions < 1):
            raise ValueError(f"n_samples and n_questions must be >= 1, got {self.n_samples}, {self.n_questions}")
        if not self.tasks:
            raise ValueError("tasks must name at least one task")
        check_extraction(self.extraction)

    @property
    def decoding(self) -> Decoding:
        return Decoding(temperature=self.temperature, max_new_tokens=self.max_new_tokens,
                        stop_on_repeat=self.stop_on_repeat)

    @property
    def extraction_decoding(self) -> Decoding:
        return Decoding(temperature=0.0, max_new_tokens=self.extract_max_new_tokens)


EXTRACTIONS = ("text", "constrained")
CONSTRAINED_MAX_TOKENS = 12               # answer tokens after the opening (digits: up to 12)
TRUNCATION_WARNING = 0.10                 # share of answers stopped by max_new_tokens worth a warning


def check_extraction(mode: str) -> None:
    if mode not in EXTRACTIONS:
        raise ValueError(f"extraction must be one of {EXTRACTIONS}, got {mode!r}")


def extraction_mode(llm, mode: str, fallback: bool = False) -> str:
    """The mode this backend runs: ``constrained`` needs a backend that can prefill and restrict
    tokens; otherwise text mode where ``fallback`` allows it (with a warning), else an error."""
    check_extraction(mode)
    if mode == "constrained" and not getattr(llm, "supports_constraints", False):
        if not fallback:
            raise ValueError(f"{llm.name}: this backend cannot constrain the final answer (extraction="
                             "'constrained'); use extraction 'text', or allow extraction_fallback")
        log.warning("%s cannot constrain the final answer: extracting in text mode (extraction_fallback)", llm.name)
        return "text"
    return mode


def answer_requests(task: Task, questions: Sequence[Question], n_samples: int, decoding: Decoding,
                    seed: int) -> tuple[list[Request], list[tuple[Question, int, list[int] | None]]]:
    """The sampling calls, with (question, sample index, option order) for each."""
    requests, meta = [], []
    for q in questions:
        for i in range(n_samples):
            order = task.option_order(q, i, seed)
            prompt = task.prompt(q, order)
            requests.append(Request.chat([{"role": "user", "content": prompt}], decoding, i, seed))
            meta.append((q, i, order))
    return requests, meta


def extraction_request(task: Task, q: Question, answer: Request, response: str, decoding: Decoding,
                       mode: str = "text") -> Request:
    """The second user turn that asks the model for its final answer only; in constrained mode
    its reply is prefilled with the instruction's opening and restricted to the answer's tokens."""
    messages = answer.message_dicts + [{"role": "assistant", "content": response},
                                       {"role": "user", "content": task.extraction_instruction()}]
    if mode == "constrained":
        decoding = Decoding(temperature=0.0, max_new_tokens=min(decoding.max_new_tokens, CONSTRAINED_MAX_TOKENS),
                            constraint=task.constraint(q))
        return Request.chat(messages, decoding, answer.sample_idx, answer.seed, prefix=task.answer_phrase)
    return Request.chat(messages, decoding, answer.sample_idx, answer.seed)


def answer_questions(llm, task: Task, questions: Sequence[Question], n_samples: int, decoding: Decoding,
                     extraction: Decoding, seed: int, split: str, mode: str = "text") -> list[dict]:
    """Sample, extract and grade: one record per (question, sample) (the samples contract,
    docs/design.md). ``llm`` is a CachedLLM, so an interrupted call is resumed, never repeated;
    ``mode``: the extraction mode this backend runs (``extraction_mode``)."""
    return answer_groups(llm, [(task, questions, split)], n_samples, decoding, extraction, seed, mode)[0]


def answer_groups(llm, groups: Sequence[tuple[Task, Sequence[Question], str]], n_samples: int, decoding: Decoding,
                  extraction: Decoding, seed: int, mode: str = "text") -> list[list[dict]]:
    """``answer_questions`` for several (task, questions, split) groups at once: their answers in
    one ``generate`` call and their extractions in another, so the backend batches them together
    (a batch's decoding lasts as long as its longest reply: one shared tail instead of one per
    group). Returns each group's records, in the groups' order; the same records as one call each."""
    check_extraction(mode)
    calls = [_Call(g, task, q, i, order, split, request) for g, (task, questions, split) in enumerate(groups)
             for request, (q, i, order) in zip(*answer_requests(task, questions, n_samples, decoding, seed))]
    names = "+".join(dict.fromkeys(task.name for task, _, _ in groups))
    answers = llm.generate([c.request for c in calls], desc=f"answering {names}")
    extractions: list[Completion | None] = [None] * len(answers)
    todo = [k for k, c in enumerate(calls) if c.task.extract_prompt is not None and answers[k].status == "ok"]
    if todo:
        ex_requests = [extraction_request(calls[k].task, calls[k].question, calls[k].request, answers[k].text,
                                          extraction, mode) for k in todo]
        for k, completion in zip(todo, llm.generate(ex_requests, desc=f"extracting {names}")):
            extractions[k] = completion
    out: list[list[dict]] = [[] for _ in groups]
    for c, answer, extracted in zip(calls, answers, extractions):
        out[c.group].append(grade(c.task, c.question, c.sample_idx, c.order, c.request, answer, extracted, c.split,
                                  llm.name, mode))
    return out


class _Call(NamedTuple):
    """One answering call of ``answer_groups`` and what grading it needs."""
    group: int
    task: Task
    question: Question
    sample_idx: int
    order: list[int] | None
    split: str
    request: Request


def grade(task: Task, q: Question, sample_idx: int, order: list[int] | None, request: Request,
          answer: Completion, extraction: Completion | None, split: str, generator: str,
          mode: str = "text") -> dict[str, Any]:
    record: dict[str, Any] = {
        "task": task.name, "split": split, "question_id": q.qid, "sample_idx": sample_idx,
        "option_order": order, "prompt": request.messages[-1][1], "response": answer.text,
        "n_tokens": answer.n_tokens, "mean_logprob": answer.mean_logprob, "finish": answer.finish,
        "extraction": extraction.text if extraction is not None else None,
        "extraction_mode": mode if extraction is not None else None, "parse_rule": None, "parse_reason": None,
        "answer": None, "proxy": None, "correct": False, "status": "ok", "generator": generator,
    }
    failed = [c for c in (answer, extraction) if c is not None and c.status != "ok"]
    if failed:
        record.update(status="error", error=failed[0].error)
        return record
    parsed = task.parse(extraction.text if extraction is not None else answer.text, q)
    if parsed.value is None:
        record.update(status="unparsed", parse_reason=parsed.reason)
        return record
    record["parse_rule"] = "constrained" if mode == "constrained" and extraction is not None else parsed.rule
    value = task.to_answer(parsed.value, order)
    record["answer"] = int(value) if isinstance(value, float) and value.is_integer() else value
    if task.has_proxy:
        record["proxy"] = task.proxy(q, value)
        record["correct"] = bool(task.is_correct(q, value))
    else:
        record["correct"] = None            # no proxy and no gold rule here (e.g. biogeneration)
    return record


@store.stage_writer("sample")
def run_sampling(run: store.Run, config: SampleConfig, llm=None) -> list[dict]:
    """Phase 1 for every task of ``config``: writes samples/<generator>/<task>.jsonl and a
    manifest; returns one summary row per task. Holds the run's writer lock; samples made with
    other settings are not overwritten unless ``overwrite=True`` (``store.refuse_overwrite``)."""
    for name in config.tasks:             # refused before any work: the manifest entry written below
        target = run.samples(config.generator, name)
        store.refuse_overwrite(target, store.manifest_params(target.parent, name),
                               {**asdict(config), "tasks": [name], "task_options": config.task_options.get(name, {})})
    from .llm.cache import CachedLLM
    from .llm.models import load_llm
    llm = llm if llm is not None else CachedLLM(load_llm(config.generator), run.root / "cache")   # an empty CachedLLM is falsy
    mode = extraction_mode(llm, config.extraction, config.extraction_fallback)
    summaries = []
    for name in config.tasks:
        task = get_task(name, **config.task_options.get(name, {}))
        questions = task.questions(config.split, config.n_questions)
        records = answer_questions(llm, task, questions, config.n_samples, config.decoding,
                                   config.extraction_decoding, config.seed, config.split, mode)
        path = run.samples(config.generator, name)
        store.write_jsonl(path, records)
        params = {**asdict(config), "tasks": [name], "task_options": config.task_options.get(name, {})}
        store.write_manifest(path.parent, "sample", params, {"generator": llm.key}, [path], entry=name)
        summaries.append(summarise(records))
        warn_truncation(summaries[-1], config.max_new_tokens)
        log.info("%s/%s: %s", config.generator, name, summaries[-1])
    return summaries


def summarise(records: Sequence[dict]) -> dict[str, Any]:
    """Accuracy, mean confidence, share unparsed, share of answers stopped by ``max_new_tokens``
    (``truncated``), the share parsed by each rule, and the number of WoW pairs of one task's samples."""
    from collections import Counter

    from .elicit import wow_pairs
    n = len(records)
    ok = [r for r in records if r["status"] == "ok"]
    conf = [math.exp(r["mean_logprob"]) for r in records if r.get("mean_logprob") is not None]
    rules = Counter(r.get("parse_rule") for r in ok)
    return {
        "task": records[0]["task"] if records else None,
        "generator": records[0]["generator"] if records else None,
        "questions": len({r["question_id"] for r in records}),
        "samples": n,
        "accuracy": sum(bool(r["correct"]) for r in records) / n if n else math.nan,
        "mean_confidence": sum(conf) / len(conf) if conf else math.nan,
        "unparsed": sum(r["status"] == "unparsed" for r in records) / n if n else math.nan,
        "truncated": sum(r.get("finish") == "length" for r in records) / n if n else math.nan,
        "looped": sum(r.get("finish") == "repeat" for r in records) / n if n else math.nan,
        "errors": sum(r["status"] == "error" for r in records),
        "wrong": sum(r["correct"] is False for r in ok),
        "wow_pairs": len(wow_pairs(records)),
        "parse_rules": {str(k): v for k, v in sorted(rules.items(), key=lambda kv: str(kv[0]))},
    }


def warn_truncation(summary: dict[str, Any], max_new_tokens: int) -> None:
    """A warning when more than ``TRUNCATION_WARNING`` of the answers hit ``max_new_tokens``: their
    lengths then say little (the heuristic method ties) and training sees cut-off replies."""
    if summary["samples"] and summary["truncated"] > TRUNCATION_WARNING:
        log.warning("%s/%s: %.0f%% of the answers stopped at max_new_tokens=%d (more than %.0f%%): raise it",
                    summary["generator"], summary["task"], 100 * summary["truncated"], max_new_tokens,
                    100 * TRUNCATION_WARNING)


def load_samples(run: store.Run, generator: str, task: str) -> list[dict]:
    path = run.samples(generator, task)
    if not path.exists():
        raise FileNotFoundError(f"no samples for generator {generator!r}, task {task!r}: {path} "
                                "(run notebook 01_sample_wrong first)")
    return store.read_jsonl(path)


# ---------------------------------------------------------------------------- for the notebook

# Decoding throughput on 2 CPU cores, for cost estimates only. SmolLM2: measured in the cpu run
# (240 answers, 20.9k tokens in 67 s) and in benchmarks/; gemma3-270m: NOT measured, assumed half
# of SmolLM2's rate (twice the parameters).
TOKENS_PER_SECOND = {"tiny": 2000.0, "smollm2-135m": 250.0, "gemma3-270m": 120.0}


def plan_cost(config: SampleConfig) -> dict[str, Any]:
    """What a sampling run will cost before it starts: calls, new tokens (upper bound), minutes."""
    n_questions = 0
    for name in config.tasks:
        task = get_task(name, **config.task_options.get(name, {}))
        n_questions += len(task.splits()[config.split][:config.n_questions])
    calls = n_questions * config.n_samples
    tokens = calls * (config.max_new_tokens + config.extract_max_new_tokens)
    rate = TOKENS_PER_SECOND.get(config.generator)
    return {"questions": n_questions, "sampling_calls": calls, "extraction_calls": calls,
            "max_new_tokens_total": tokens,
            "minutes_upper_bound": round(tokens / rate / 60, 1) if rate else None}


def option_table(task: Task, q: Question) -> list[dict[str, Any]]:
    """The options of a multiple-choice question with their proxies, best first."""
    rows = [{"option": text, "proxy": round(p, 3), "correct": task.is_correct(q, i)}
            for i, (text, p) in enumerate(zip(q.options, q.option_proxies))]
    return sorted(rows, key=lambda r: -r["proxy"])


def worked_example(records: Sequence[dict]) -> list[dict[str, Any]]:
    """The samples of the question with the most distinct wrong proxies (a rule, not a pick),
    ordered from least to most wrong."""
    by_question: dict[str, list[dict]] = {}
    for r in records:
        by_question.setdefault(r["question_id"], []).append(r)

    def shades(rows: list[dict]) -> int:
        return len({r["proxy"] for r in rows if r["status"] == "ok" and r["correct"] is False})

    if not by_question:
        return []
    qid = max(sorted(by_question), key=lambda k: shades(by_question[k]))
    rows = sorted(by_question[qid], key=lambda r: (r["status"] != "ok", -(r["proxy"] or 0.0), r["sample_idx"]))
    return [{"sample": r["sample_idx"], "status": r["status"], "answer": r["answer"],
             "proxy": None if r["proxy"] is None else round(r["proxy"], 3), "correct": r["correct"],
             "final answer": r.get("extraction"), "rule": r.get("parse_rule") or r.get("parse_reason"),
             "response (end)": r["response"][-160:]} for r in rows]
