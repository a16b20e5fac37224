"""Phase 2 data: preference datasets in trl's standard form (``prompt``, ``chosen``, ``rejected``)
plus provenance columns (task, question_id, source, method, chosen/rejected proxy and sample).

| name | chosen over rejected | from |
|---|---|---|
| ``oracle`` | the higher proxy (the silver label) | WoW pairs |
| ``direct`` | the pairwise judge's verdict (optionally swap-consistent only) | WoW pairs + pairwise judgments |
| ``score`` | the higher judge score, top-p share by score gap | wrong pairs + score judgments |
| ``row`` | a correct answer over a wrong one (right-over-wrong) | pairs with exactly one correct |
| ``row+oracle``, ``row+direct``, ``row+score`` | 50:50 mixes | |
| ``random`` (control) | the oracle pairs, direction flipped at random | WoW pairs |
| ``sft_wrong`` (control) | supervised fine-tuning on the oracle pairs' chosen (wrong) answers | WoW pairs |

Sources: ``self`` (the aligned model's own answers) or ``mix`` (every generator of the run). Pairs come
from D_train only (a record of another split is an error); at most 4,000 pairs are kept (the paper's
cap, a seeded sample); pairs whose two texts are identical or empty are removed and counted.
"""
from __future__ import annotations

import logging
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from . import paths, store
from .elicit import PROXY_TOL, is_wow_candidate, wow_pairs
from .tasks import Task, get_task
from .seeds import stable_seed

log = logging.getLogger(__name__)

WOW_TYPES = ("oracle", "direct", "score")
MIXES = ("row+oracle", "row+direct", "row+score")
CONTROLS = ("random", "sft_wrong")
TYPES = WOW_TYPES + ("row",) + MIXES + CONTROLS
CAP = 4000


@dataclass(frozen=True)
class PrefSpec:
    """One preference dataset: its type, source, judge and task(s)."""

    type: str
    source: str = "self"                   # "self" | "mix"
    tasks: tuple[str, ...] = ("kc",)
    judge: str | None = None               # direct / score types
    filtered: bool = True                  # direct: keep swap-consistent verdicts only
    top_p: float = 0.5                     # score: share of pairs kept, largest score gap first
    cap: int = CAP
    seed: int = 42

    def __post_init__(self) -> None:
        # A bare task name would otherwise be iterated letter by letter ("kc" -> "k_c").
        object.__setattr__(self, "tasks", (self.tasks,) if isinstance(self.tasks, str) else tuple(self.tasks))
        if not self.tasks:
            raise ValueError("a preference set needs at least one task")
        if self.type not in TYPES:
            raise ValueError(f"preference type must be one of {TYPES}, got {self.type!r}")
        if self.source not in ("self", "mix"):
            raise ValueError(f"source must be 'self' or 'mix', got {self.source!r}")
        if self.base in ("direct", "score") and not self.judge:
            raise ValueError(f"preference type {self.type!r} needs a judge")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.cap < 1:
            raise ValueError(f"cap must be a positive number of pairs, got {self.cap}")

    @property
    def base(self) -> str:
        """The WoW method behind a mix ("row+score" -> "score")."""
        return self.type.split("+")[-1]

    @property
    def name(self) -> str:
        parts = [self.source, self.type.replace("+", "_")]
        if self.base == "direct":
            parts.append(f"{self.judge}{'-filtered' if self.filtered else ''}")
        if self.base == "score":
            parts.append(f"{self.judge}-top{self.top_p:g}")
        return "-".join(parts + ["_".join(self.tasks)])


@dataclass
class PrefStats:
    candidates: int = 0
    degenerate: int = 0
    capped: int = 0
    kept: int = 0
    by_task: dict[str, int] = field(default_factory=dict)


# ---------------------------------------------------------------------------- pair builders

def preference_prompt(task: Task, qid: str, questions: dict) -> str:
    """The prompt the pair is trained under. For multiple choice the two answers saw different
    option orders, so (as in the paper's code) the options are left out; otherwise it is the
    sampling prompt itself."""
    return paths.prompt_text("cot") + questions[qid].query


def _pair(task: Task, questions: dict, a: dict, b: dict, method: str) -> dict[str, Any]:
    """``a`` chosen over ``b``."""
    return {"prompt": preference_prompt(task, a["question_id"], questions),
            "chosen": a["response"], "rejected": b["response"], "task": task.name,
            "question_id": a["question_id"], "source": a["generator"], "method": method,
            "chosen_proxy": a["proxy"], "rejected_proxy": b["proxy"],
            "chosen_sample": a["sample_idx"], "rejected_sample": b["sample_idx"]}


def _index(samples: Sequence[dict]) -> dict[tuple[str, str, int], dict]:
    return {(r["generator"], r["question_id"], r["sample_idx"]): r for r in samples}


def oracle_pairs(task: Task, questions: dict, samples: Sequence[dict]) -> list[dict]:
    by_key = _index(samples)
    out = []
    for p in wow_pairs(samples):
        a, b = by_key[(p.generator, p.question_id, p.i)], by_key[(p.generator, p.question_id, p.j)]
        out.append(_pair(task, questions, a, b, "oracle") if p.proxy_i > p.proxy_j
                   else _pair(task, questions, b, a, "oracle"))
    return out


def random_pairs(task: Task, questions: dict, samples: Sequence[dict], seed: int) -> list[dict]:
    """The oracle pairs with each direction flipped by a fair coin: same texts, no signal."""
    rng = random.Random(seed)
    out = []
    for pair in oracle_pairs(task, questions, samples):
        if rng.random() < 0.5:
            pair = {**pair, "chosen": pair["rejected"], "rejected": pair["chosen"],
                    "chosen_proxy": pair["rejected_proxy"], "rejected_proxy": pair["chosen_proxy"],
                    "chosen_sample": pair["rejected_sample"], "rejected_sample": pair["chosen_sample"]}
        out.append({**pair, "method": "random"})
    return out


def direct_pairs(task: Task, questions: dict, samples: Sequence[dict], judgments: Sequence[dict],
                 filtered: bool) -> list[dict]:
    """Pairs ordered by the pairwise judge; with ``filtered``, only verdicts that follow the
    answers when the two outputs are swapped."""
    by_key = _index(samples)
    out = []
    for j in judgments:
        if j.get("status") != "ok" or j.get("verdict") not in (1, 2):
            continue
        if filtered and not (j.get("swapped_status") == "ok" and j.get("swapped_verdict") in (1, 2)
                             and j["swapped_verdict"] != j["verdict"]):
            continue
        a = by_key[(j["generator"], j["question_id"], j["i"])]
        b = by_key[(j["generator"], j["question_id"], j["j"])]
        out.append(_pair(task, questions, a, b, "direct") if j["verdict"] == 1
                   else _pair(task, questions, b, a, "direct"))
    return out


def score_pairs(task: Task, questions: dict, samples: Sequence[dict], judgments: Sequence[dict],
                top_p: float) -> list[dict]:
    """Pairs of wrong answers ordered by judge score, keeping the ``top_p`` share with the largest
    score gap (the paper's margin). Equal scores carry no preference and are left out. For graded
    tasks, pairs with equal proxies are left out as in the paper; binary tasks (MedMCQA, SciBench)
    have no graded proxy, so every pair of differently scored wrong answers counts."""
    by_key = _index(samples)
    scores: dict[tuple[str, str, int], float] = {}
    for j in judgments:
        if j.get("status") == "ok" and j.get("scores") is not None:
            for idx, s in zip(j["samples"], j["scores"]):
                scores[(j["generator"], j["question_id"], idx)] = float(s)
    wrong: dict[tuple[str, str], list[tuple[str, str, int]]] = {}
    for key in sorted(scores):
        r = by_key[key]
        if r["status"] == "ok" and r["correct"] is False:
            wrong.setdefault(key[:2], []).append(key)
    candidates = []
    for keys in wrong.values():
        for x in range(len(keys)):
            for y in range(x + 1, len(keys)):
                a, b = by_key[keys[x]], by_key[keys[y]]
                gap = scores[keys[x]] - scores[keys[y]]
                if gap == 0 or (task.graded and not _graded_pair(a, b)):
                    continue
                pair = _pair(task, questions, a, b, "score") if gap > 0 else _pair(task, questions, b, a, "score")
                candidates.append((abs(gap), len(candidates), pair))
    candidates.sort(key=lambda c: (-c[0], c[1]))
    return [pair for _, _, pair in candidates[:int(len(candidates) * top_p)]]


def _graded_pair(a: dict, b: dict) -> bool:
    """Two wrong answers of a graded task form a WoW pair (as in ``elicit.wow_pairs``)."""
    return is_wow_candidate(a) and is_wow_candidate(b) and abs(a["proxy"] - b["proxy"]) > PROXY_TOL


def row_pairs(task: Task, questions: dict, samples: Sequence[dict]) -> list[dict]:
    """Right-over-wrong: every (correct, wrong) pair of answers to the same question; a wrong
    answer may be unparsed (it is still wrong), an errored call is not an answer."""
    by_question: dict[tuple[str, str], list[dict]] = {}
    for r in samples:
        if r["status"] != "error" and r["correct"] is not None:
            by_question.setdefault((r["generator"], r["question_id"]), []).append(r)
    out = []
    for rows in by_question.values():
        for a in (r for r in rows if r["correct"]):
            out += [_pair(task, questions, a, b, "row") for b in rows if not b["correct"]]
    return out


# ---------------------------------------------------------------------------- datasets

def build(spec: PrefSpec, samples: dict[tuple[str, str], list[dict]],
          judgments: dict[tuple[str, str, str, str], list[dict]] | None = None) -> tuple[list[dict], PrefStats]:
    """The preference dataset of ``spec``. ``samples[(generator, task)]`` are Phase 1 records
    (D_train only); ``judgments[(generator, judge, task, kind)]`` the judge records."""
    judgments = judgments or {}
    rng = random.Random(spec.seed)
    stats = PrefStats()
    per_type: dict[str, list[dict]] = {}
    for (generator, task_name), records in sorted(samples.items()):
        if task_name not in spec.tasks:
            continue
        _check_train_only(records, generator, task_name)
        task = get_task(task_name)
        questions = {q.qid: q for q in task.splits()["train"]}
        for kind in spec.type.split("+"):
            pairs = _pairs_of(kind, spec, task, questions, records, generator, judgments)
            per_type.setdefault(kind, []).extend(pairs)
    pools = {k: _drop_degenerate(v, stats) for k, v in per_type.items()}
    stats.candidates = sum(len(v) for v in per_type.values())
    if "+" in spec.type:                      # 50:50 mix: equal numbers from each side
        kinds = spec.type.split("+")
        k = min(min(len(pools.get(kind, [])) for kind in kinds), spec.cap // 2)
        stats.capped = sum(len(v) for v in pools.values()) - k * len(kinds)
        data = [p for kind in kinds for p in _sample(pools.get(kind, []), k, rng)]
    else:
        pool = pools.get(spec.type, [])
        stats.capped = max(0, len(pool) - spec.cap)
        data = _sample(pool, min(len(pool), spec.cap), rng)
    if spec.type == "sft_wrong":
        data = [{**p, "method": "sft_wrong"} for p in data]
    stats.kept = len(data)
    for p in data:
        stats.by_task[p["task"]] = stats.by_task.get(p["task"], 0) + 1
    return data, stats


def _pairs_of(kind: str, spec: PrefSpec, task: Task, questions: dict, records: list[dict], generator: str,
              judgments: dict) -> list[dict]:
    if kind in ("oracle", "sft_wrong"):
        return oracle_pairs(task, questions, records)
    if kind == "random":
        # one coin sequence per (generator, task): the same seed everywhere would flip the n-th
        # pair of every generator and task alike
        return random_pairs(task, questions, records, stable_seed("prefs-random", spec.seed, generator, task.name))
    if kind == "row":
        return row_pairs(task, questions, records)
    judge_kind = "pairwise" if kind == "direct" else "score"
    key = (generator, spec.judge, task.name, judge_kind)
    if key not in judgments:
        raise FileNotFoundError(f"preference type {spec.type!r} needs {judge_kind} judgments of "
                                f"{generator}'s {task.name} answers by judge {spec.judge!r} (run notebook 02_elicit)")
    if kind == "direct":
        return direct_pairs(task, questions, records, judgments[key], spec.filtered)
    return score_pairs(task, questions, records, judgments[key], spec.top_p)


def _check_train_only(records: Iterable[dict], generator: str, task: str) -> None:
    splits = {r["split"] for r in records}
    if splits - {"train"}:
        raise ValueError(f"preferences must come from D_train only, but {generator}/{task} samples "
                         f"include splits {sorted(splits - {'train'})}")


def _drop_degenerate(pairs: list[dict], stats: PrefStats) -> list[dict]:
    kept = [p for p in pairs if p["chosen"].strip() and p["rejected"].strip()
            and p["chosen"].strip() != p["rejected"].strip()]
    stats.degenerate += len(pairs) - len(kept)
    return kept


def _sample(pool: list[dict], k: int, rng: random.Random) -> list[dict]:
    """A seeded sample of ``k`` pairs, in their original order (stable files)."""
    if k >= len(pool):
        return list(pool)
    keep = sorted(rng.sample(range(len(pool)), k))
    return [pool[i] for i in keep]


def conversational(pair: dict) -> dict:
    """A pair in trl's conversational form: ``prompt`` a user turn, ``chosen``/``rejected`` an
    assistant turn each (``trl.data_utils.is_conversational`` is True), provenance columns kept.
    A stock trl trainer then renders it with the model's chat template, as our training does."""
    out = dict(pair)
    if isinstance(out["prompt"], str):
        out["prompt"] = [{"role": "user", "content": out["prompt"]}]
    for column in ("chosen", "rejected"):
        if isinstance(out[column], str):
            out[column] = [{"role": "assistant", "content": out[column]}]
    return out


def text(value: str | list[dict]) -> str:
    """The text of a prompt or an answer, in either form (a string, or conversational turns)."""
    return value if isinstance(value, str) else "\n".join(m["content"] for m in value)


def write(run: store.Run, spec: PrefSpec, data: list[dict], stats: PrefStats) -> None:
    """``prefs/<name>.jsonl`` in trl's conversational form (``datasets.load_dataset("json", ...)``
    reads it as it is) and ``prefs/<name>.stats.json`` (the spec and the counts)."""
    path = run.prefs(spec.name)
    store.write_jsonl(path, [conversational(pair) for pair in data])
    store.write_json(path.with_suffix(".stats.json"), {"spec": spec.__dict__, **stats.__dict__})


def load(run: store.Run, name: str) -> list[dict]:
    """The records of ``prefs/<name>.jsonl`` (conversational; ``text`` gives a turn's text)."""
    path = run.prefs(name)
    if not path.exists():
        raise FileNotFoundError(f"no preference dataset {name!r} at {path} (build it in notebook 03_align)")
    return store.read_jsonl(path)


# ---------------------------------------------------------------------------- the stage

def elicitation_key(spec: PrefSpec) -> tuple[str, str, float] | None:
    """The row of ``elicitation/rows.csv`` (method, judge, margin) that measured how well the
    labels of ``spec`` order WoW pairs, for Figure 2 (elicitation accuracy vs alignment gain).
    None for labels that are not elicited (oracle, row, controls)."""
    if spec.base not in ("direct", "score") or spec.type in CONTROLS:
        return None
    # The judge folder is "<judge>" (text mode) or "<judge>-logprob" (``judge.judge_folder``); judge
    # names contain hyphens themselves ("smollm2-135m"), so only that suffix is split off.
    judge, suffix = spec.judge, ""
    if judge.endswith("-logprob"):
        judge, suffix = judge.removesuffix("-logprob"), "_logprob"
    if spec.base == "direct":
        return f"pairwise{suffix}{'_consistent' if spec.filtered else ''}", judge, 1.0
    return f"score{suffix}", judge, spec.top_p


def run_records(run: store.Run, spec: PrefSpec, base_model: str) -> tuple[dict, dict]:
    """The Phase 1 inputs of ``spec`` from the run directory: samples of ``base_model`` (source
    "self") or of every generator in ``samples/`` (source "mix"), and the judgment files of
    ``spec.judge`` on them that its type needs (only those are read)."""
    from .sample import load_samples
    generators = [base_model] if spec.source == "self" else \
        sorted(p.name for p in (run.root / "samples").iterdir() if p.is_dir())
    samples = {(g, t): load_samples(run, g, t) for g in generators for t in spec.tasks
               if spec.source == "self" or run.samples(g, t).exists()}
    judgments = {}
    kinds = {"direct": "pairwise", "score": "score"}
    if spec.base in kinds and spec.type not in CONTROLS:
        for generator, task in samples:
            path = run.judgments(generator, spec.judge, task, kinds[spec.base])
            if path.exists():
                judgments[(generator, spec.judge, task, kinds[spec.base])] = store.read_jsonl(path)
    return samples, judgments


@store.stage_writer("prefs")
def build_sets(run: store.Run, specs: Sequence[PrefSpec], base_model: str) -> list[dict[str, Any]]:
    """Build and write every preference dataset of ``specs`` (``prefs/<name>.jsonl`` +
    ``.stats.json``) and ``prefs/summary.csv``; returns one summary row per set. Holds the run's
    writer lock; a set built from another spec is not overwritten unless ``overwrite=True``."""
    for spec in specs:                    # refused before any work: the spec recorded in .stats.json
        stats = run.prefs(spec.name).with_suffix(".stats.json")
        store.refuse_overwrite(run.prefs(spec.name), store.read_json(stats).get("spec") if stats.exists() else None,
                               spec.__dict__)
    rows = []
    for spec in specs:
        data, stats = build(spec, *run_records(run, spec, base_model))
        write(run, spec, data, stats)
        key = elicitation_key(spec)
        rows.append({"name": spec.name, "type": spec.type, "source": spec.source, "judge": spec.judge,
                     "tasks": "+".join(spec.tasks), "candidates": stats.candidates, "degenerate": stats.degenerate,
                     "capped": stats.capped, "kept": stats.kept,
                     "elicitation_method": key[0] if key else None, "elicitation_judge": key[1] if key else None,
                     "elicitation_margin": key[2] if key else None})
        log.info("preference set %s: %d pairs kept (%d candidates, %d degenerate)", spec.name, stats.kept,
                 stats.candidates, stats.degenerate)
    store.write_csv(run.root / "prefs" / "summary.csv", rows)
    return rows


def plan_sets(tasks: Sequence[str], types: Sequence[str], judge: str | None, extra: Sequence[str] = (),
              sources: Sequence[str] = ("self",), cap: int = CAP, seed: int = 42, top_p: float = 0.5,
              judge_mode: str = "logprob") -> list[PrefSpec]:
    """The preference sets of a run: every type of ``types`` on every task of ``tasks`` from every
    source of ``sources`` (direct and score labelled by ``judge``), then the ``extra`` sets, each
    written ``"<source> <type>[@<judge>] <task>[+<task>...] [unfiltered]"``, e.g. ``"mix oracle kc"``
    (every generator's answers) or ``"self score@gemma3-270m kc"`` (another judge's labels: one more
    point of Figure 2); ``"self direct@tiny:text kc"`` takes that judge's text-mode verdicts, and a
    trailing ``unfiltered`` keeps a direct set's verdicts that flip when the two answers are swapped
    (a judge that always answers "1" has no swap-consistent verdicts). Judges are named as in the
    profile; their judgments in ``judge_mode`` unless the set says otherwise."""
    from .judge import judge_folder

    def spec(kind: str, source: str, task_names: Sequence[str], by: str | None, mode: str,
             filtered: bool = True) -> PrefSpec:
        base = kind.split("+")[-1]
        labelled = base in ("direct", "score") and kind not in CONTROLS
        return PrefSpec(kind, source=source, tasks=tuple(task_names), cap=cap, seed=seed, top_p=top_p,
                        judge=judge_folder(by, mode) if labelled and by else None, filtered=filtered)

    specs = [spec(t, s, (task,), judge, judge_mode) for task in tasks for s in sources for t in types]
    for line in extra:
        words = line.split()
        unfiltered = len(words) == 4 and words[3] == "unfiltered"
        if len(words) != 3 + unfiltered or words[0] not in ("self", "mix"):
            raise ValueError(f"extra preference set {line!r}: expected '<self|mix> <type>[@<judge>[:<mode>]] "
                             "<task>[+<task>] [unfiltered]', e.g. 'mix oracle kc' or 'self score@gemma3-270m kc'")
        kind, _, labeller = words[1].partition("@")
        if unfiltered and kind.split("+")[-1] != "direct":
            raise ValueError(f"extra preference set {line!r}: 'unfiltered' applies to direct sets only")
        by, _, mode = labeller.partition(":")
        if kind not in TYPES:
            raise ValueError(f"extra preference set {line!r}: type {kind!r} is not one of {TYPES}")
        if mode not in ("", "text", "logprob"):
            raise ValueError(f"extra preference set {line!r}: judge mode {mode!r} is not 'text' or 'logprob'")
        specs.append(spec(kind, words[0], words[2].split("+"), by or judge, mode or judge_mode, not unfiltered))
    return list(dict.fromkeys(specs))
