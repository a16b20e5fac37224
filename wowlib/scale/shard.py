"""Sharded runs: Phase 1 sampling, judging and evaluation split into independent jobs (e.g. a job
array on a cluster), then merged into exactly the file an unsharded run writes.

Shards are CONTIGUOUS question ranges of each task: with ``N`` questions and ``count`` shards,
shard ``i`` gets questions ``[start_i, stop_i)``, the first ``N % count`` shards one question
more than the others (as ``numpy.array_split``). Contiguous ranges make the merge a plain
concatenation in shard order, which reproduces the unsharded record order (question by question,
sample by sample) without re-sorting. The questions are the ones ``run_sampling`` would ask (the
task's split, first ``n_questions``), so a shard never depends on another shard's output.

Files, beside the unsharded ``samples/<generator>/<task>.jsonl``:

- ``<task>.shard-<i>-of-<n>.jsonl``: the records of shard ``i`` (``i`` counts from 0), written
  with ``store.write_jsonl`` like the unsharded file;
- ``<task>.shard-<i>-of-<n>.json``: its sidecar (question range and ids, parameters, model key,
  the shard file's sha256): what the merge checks before it trusts a shard.

Each shard keeps its own call cache, ``cache/shard-<i>-of-<n>/``: shard jobs that share one run
directory (a network file system) never append to the same cache file, and run directories
gathered from separate machines never collide. A rerun of a shard skips when its file and
sidecar are complete; with ``force=True`` it recomputes through its cache (no model calls twice).

``merge_samples`` writes the unsharded file with the same bytes as ``run_sampling`` (same
records, same order, same ``store.write_jsonl``) and its manifest entry, given the same answer
per request. The hf backend seeds each request's sampling on its own, so the sampled TEXT does
not depend on which shard asked, but a shard batches fewer requests together than the unsharded
run, and log-probs carry floating-point noise from the batch's shape: ~3e-7 in ``mean_logprob``
on the tiny model in fp32 (measured; tests/test_shard.py). Decoding one request per batch
(``HFOptions(max_batch=1)``) removes it and makes the merge byte-identical; in bf16 on a GPU the
noise can, rarely, flip a sampled token, exactly as changing the batch size of an unsharded run
would.

Evaluation (``run_evaluation_shard``, ``merge_evaluation``) shards the (split, question) items of
``evaluate.eval_items`` (D_val then D_test, so a shard may straddle the two) into
``eval/<label>/<task>.shard-<i>-of-<n>.jsonl``; the merge writes the file ``answer_split`` writes
and its manifest entry, whose hash makes ``run_evaluation`` reuse it.

Judging (``run_judging_shard``, ``merge_judgments``/``merge_judging``) plans each job in full
(``judge.JudgePlan``: the pair cap applies to ALL pairs), then judges the units (pairs, or score
batches, both grouped by question) of its contiguous range of the plan's questions: exactly the
records the unsharded run writes for them. Log-prob ``run_judging`` reuses a merged file (its
manifest entry); text mode always asks through the run's cache, so ``merge_judging`` also appends
the shards' caches to ``cache/`` (``merge_caches``) and the rerun calls nothing. Log-prob verdicts
are forward passes: batched with other prompts they carry the same float noise (~2e-6 on the tiny
model in fp32; a verdict flips only at a near-tie), and ``max_batch=1`` removes it too.
"""
from __future__ import annotations

import functools
import itertools
import json
import logging
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

from .. import store

log = logging.getLogger(__name__)

T = TypeVar("T")
_SPEC = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` (from 0) of ``count``."""

    index: int
    count: int

    def __post_init__(self) -> None:
        for name in ("index", "count"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"Shard.{name} must be an integer, got {value!r}")
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ValueError(f"a shard needs count >= 1 and 0 <= index < count, got index {self.index}, "
                             f"count {self.count}")

    @classmethod
    def parse(cls, spec: str) -> Shard:
        """``"2/8"``: shard 2 (from 0) of 8."""
        match = _SPEC.match(spec)
        if not match:
            raise ValueError(f"a shard is written 'index/count' (index from 0), got {spec!r}")
        return cls(int(match[1]), int(match[2]))

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Shard:
        """The shard of this job: ``WOW_SHARD="i/n"``, or a Slurm job array (``SLURM_ARRAY_TASK_ID``
        counted from ``SLURM_ARRAY_TASK_MIN``, ``SLURM_ARRAY_TASK_COUNT`` shards, so ``--array=0-7``
        and ``--array=1-8`` both give shards 0..7 of 8); ``0/1`` when neither is set."""
        env = os.environ if environ is None else environ
        if env.get("WOW_SHARD"):
            return cls.parse(env["WOW_SHARD"])
        if env.get("SLURM_ARRAY_TASK_ID") and env.get("SLURM_ARRAY_TASK_COUNT"):
            first = int(env.get("SLURM_ARRAY_TASK_MIN") or 0)
            return cls(int(env["SLURM_ARRAY_TASK_ID"]) - first, int(env["SLURM_ARRAY_TASK_COUNT"]))
        return cls(0, 1)

    @property
    def tag(self) -> str:
        return f"shard-{self.index}-of-{self.count}"

    def bounds(self, n: int) -> tuple[int, int]:
        """``[start, stop)`` of this shard among ``n`` items (balanced, contiguous)."""
        size, extra = divmod(n, self.count)
        start = self.index * size + min(self.index, extra)
        return start, start + size + (self.index < extra)

    def select(self, items: Sequence[T]) -> list[T]:
        start, stop = self.bounds(len(items))
        return list(items[start:stop])


# ---------------------------------------------------------------------------- generic shard files

def shard_path(path: Path, shard: Shard) -> Path:
    """``x/kc.jsonl`` -> ``x/kc.shard-0-of-2.jsonl``."""
    return path.with_name(f"{path.stem}.{shard.tag}{path.suffix}")


def sidecar_path(path: Path, shard: Shard) -> Path:
    return shard_path(path, shard).with_suffix(".json")


def write_shard(path: Path, shard: Shard, records: Sequence[dict], meta: dict[str, Any]) -> Path:
    """Write one shard's records (``store.write_jsonl``) and then its sidecar (``meta`` + shard,
    record count, file hash). The sidecar is written last: a shard without one is incomplete."""
    target = shard_path(path, shard)
    store.write_jsonl(target, records)
    store.write_json(sidecar_path(path, shard), {**meta, "shard": {"index": shard.index, "count": shard.count},
                                                 "n_records": len(records), "sha256": store.file_sha256(target)})
    log.info("%s: items %s, %d records", target, meta.get("range"), len(records))
    return target


def shard_complete(path: Path, shard: Shard, meta: dict[str, Any]) -> bool:
    """Whether the shard's file and sidecar exist, agree with each other and with ``meta``."""
    target, side = shard_path(path, shard), sidecar_path(path, shard)
    if not target.exists() or not side.exists():
        return False
    try:
        info = store.read_json(side)
    except (ValueError, OSError):
        return False
    return (all(info.get(k) == v for k, v in meta.items())
            and info.get("sha256") == store.file_sha256(target))


def merge_shards(path: Path, count: int, agree: Sequence[str] = ()) -> tuple[list[dict], list[dict]]:
    """The records of shards ``0..count-1`` of ``path`` concatenated in shard order, and their
    sidecars, after checking that every shard is present and complete, that the sidecars agree on
    the ``agree`` keys, and that their ``range`` entries tile ``[0, n_items)`` in order."""
    if not isinstance(count, int) or count < 1:
        raise ValueError(f"count must be an integer >= 1, got {count!r}")
    shards = [Shard(i, count) for i in range(count)]
    missing = [shard_path(path, s) for s in shards if not shard_path(path, s).exists()]
    missing += [sidecar_path(path, s) for s in shards
                if shard_path(path, s).exists() and not sidecar_path(path, s).exists()]
    if missing:
        names = ", ".join(p.name for p in missing)
        raise FileNotFoundError(f"cannot merge {path.name} from {count} shards: missing {names} in {path.parent} "
                                "(run those shards, or wait for them to finish)")
    records: list[dict] = []
    sidecars: list[dict] = []
    covered = 0
    for s in shards:
        target, info = shard_path(path, s), store.read_json(sidecar_path(path, s))
        if info.get("shard") != {"index": s.index, "count": s.count}:
            raise ValueError(f"{sidecar_path(path, s).name}: describes shard {info.get('shard')}, not {s.tag}")
        if info.get("sha256") != store.file_sha256(target):
            raise ValueError(f"{target.name}: does not match its sidecar (changed or partly written): rerun {s.tag}")
        first = sidecars[0] if sidecars else info
        for key in (*agree, "n_items"):
            if info.get(key) != first.get(key):
                raise ValueError(f"{target.name}: {key!r} differs from shard 0's; all shards of a merge must come "
                                 "from one configuration")
        start, stop = info.get("range") or (None, None)
        if start != covered:
            raise ValueError(f"{target.name}: covers items {start}..{stop}, expected to start at item {covered}")
        covered = stop
        shard_records = store.read_jsonl(target)
        if len(shard_records) != info.get("n_records"):
            raise ValueError(f"{target.name}: {len(shard_records)} records, its sidecar says {info.get('n_records')}")
        records += shard_records
        sidecars.append(info)
    if covered != sidecars[0].get("n_items"):
        raise ValueError(f"{path.name}: the shards cover {covered} of {sidecars[0].get('n_items')} items")
    return records, sidecars


def _range_meta(params: dict, shard: Shard, ids: Sequence[Any]) -> dict[str, Any]:
    """A shard's sidecar entries for its contiguous range of the items ``ids``."""
    start, stop = shard.bounds(len(ids))
    return {"params": params, "range": [start, stop], "n_items": len(ids), "question_ids": list(ids[start:stop])}


def _completed(path: Path, shard: Shard, meta: dict[str, Any], force: bool) -> list[dict] | None:
    """The records of a shard already complete for ``meta`` (read back, nothing called), or None
    when it must be computed (``force``: always)."""
    if force or not shard_complete(path, shard, meta):
        return None
    log.info("%s %s: complete, skipped", path, shard.tag)
    return store.read_jsonl(shard_path(path, shard))


def _shard_llm(run: store.Run, shard: Shard, name: str, adapter: str | None = None):
    """Model ``name`` behind the shard's own call cache, ``cache/shard-<i>-of-<n>/``."""
    from ..llm.cache import CachedLLM
    from ..llm.models import load_llm
    return CachedLLM(load_llm(name, adapter=adapter), run.root / "cache" / shard.tag)


def _lazy(llm, load: Callable[[], Any]) -> Callable[[], Any]:
    """``llm``, or ``load()`` on first use: a rerun of a complete shard never loads a model."""
    return functools.cache(lambda: llm if llm is not None else load())


def _as_json(obj: Any) -> Any:
    """``obj`` as a sidecar reads it back (tuples become lists), so that ``shard_complete`` compares like with like."""
    return json.loads(json.dumps(obj))


def merge_caches(run: store.Run, count: int) -> list[Path]:
    """Append the call caches of shards ``0..count-1`` to the run's ``cache/``, each call once, so
    that an unsharded stage over the same calls (text-mode ``run_judging``, notebook 01) answers
    from the cache instead of calling the model again. Returns the cache files written."""
    written = []
    for source in sorted(p for i in range(count) for p in (run.root / "cache" / Shard(i, count).tag).glob("*.jsonl")):
        target = run.root / "cache" / source.name
        done = {r["key"] for r in store.iter_jsonl(target)}
        store.append_jsonl(target, [r for r in store.iter_jsonl(source) if r["key"] not in done])
        written.append(target)
    return sorted(set(written))


# ---------------------------------------------------------------------------- Phase 1 sampling

def _task_params(config, name: str) -> dict[str, Any]:
    """The parameters ``run_sampling`` records for one task (its manifest entry), as JSON reads them."""
    return _as_json({**asdict(config), "tasks": [name], "task_options": config.task_options.get(name, {})})


def run_sampling_shard(run: store.Run, config, shard: Shard, llm=None, force: bool = False) -> list[dict[str, Any]]:
    """Phase 1 for shard ``shard`` of every task of ``config`` (a ``sample.SampleConfig``): writes
    ``samples/<generator>/<task>.shard-<i>-of-<n>.jsonl`` (+ sidecar); returns one summary row per
    task (for this shard's questions). ``llm``: a ``CachedLLM`` (default: the generator behind
    the shard's own cache, ``cache/shard-<i>-of-<n>/``)."""
    from ..sample import answer_questions, extraction_mode, summarise
    from ..tasks import get_task
    model = _lazy(llm, lambda: _shard_llm(run, shard, config.generator))
    summaries = []
    for name in config.tasks:
        task = get_task(name, **config.task_options.get(name, {}))
        items = task.splits()[config.split][:config.n_questions]
        meta = _range_meta(_task_params(config, name), shard, [q.qid for q in items])
        path = run.samples(config.generator, name)
        records = _completed(path, shard, meta, force)
        if records is None:
            questions = task.materialise(items[slice(*meta["range"])])
            mode = extraction_mode(model(), config.extraction, config.extraction_fallback) if questions else "text"
            records = answer_questions(model(), task, questions, config.n_samples, config.decoding,
                                       config.extraction_decoding, config.seed, config.split, mode) if questions else []
            write_shard(path, shard, records, {**meta, "generator_key": model().key})
        summaries.append({**summarise(records), "shard": shard.tag})
    return summaries


def merge_samples(run: store.Run, generator: str, task: str, count: int) -> Path:
    """Merge the ``count`` shards of ``samples/<generator>/<task>`` into the unsharded file (the
    bytes ``run_sampling`` writes) and its manifest entry; returns the file's path. A missing or
    incomplete shard is an error that names it."""
    path = run.samples(generator, task)
    records, sidecars = merge_shards(path, count, agree=("params", "generator_key"))
    store.write_jsonl(path, records)
    store.write_manifest(path.parent, "sample", sidecars[0]["params"], {"generator": sidecars[0]["generator_key"]},
                         [path], entry=task)
    log.info("%s/%s: merged %d shards, %d records", generator, task, count, len(records))
    return path


def merge_all_samples(run: store.Run, config, count: int) -> list[Path]:
    """``merge_samples`` for every task of ``config``."""
    return [merge_samples(run, config.generator, name, count) for name in config.tasks]


# ---------------------------------------------------------------------------- evaluation

def run_evaluation_shard(run: store.Run, config, label: str, adapter: str | None, tasks: Sequence[str],
                         shard: Shard, llm=None, force: bool = False) -> list[dict[str, Any]]:
    """Shard ``shard`` of ``evaluate.answer_split`` for one model (``label``, with ``adapter`` or
    the base model when None) on ``tasks``, with ``config`` an ``evaluate.EvalConfig``. The items
    are the (split, question) pairs in record order (``evaluate.eval_items``: D_val then D_test),
    so the contiguous ranges concatenate back into the unsharded file. Writes
    ``eval/<label>/<task>.shard-<i>-of-<n>.jsonl`` (+ sidecar); returns one summary row per task.
    ``llm``: a ``CachedLLM`` (default: the model behind the shard's own cache)."""
    from ..evaluate import answer_items, eval_items, eval_params
    from ..sample import summarise
    from ..tasks import get_task
    model = _lazy(llm, lambda: _shard_llm(run, shard, config.base_model, adapter))
    summaries = []
    for name in tasks:
        task = get_task(name, **(config.task_options or {}).get(name, {}))
        items = eval_items(config, task)
        meta = _range_meta(_as_json(eval_params(config, label, adapter, name, run)), shard,
                           [[split, q.qid] for split, q in items])
        records = _completed(run.eval(label, name), shard, meta, force)
        if records is None:
            records = answer_items(model(), config, task, items[slice(*meta["range"])], label)
            write_shard(run.eval(label, name), shard, records, {**meta, "model_key": model().key})
        summaries.append({**summarise(records), "shard": shard.tag})
    return summaries


def merge_evaluation(run: store.Run, label: str, tasks: Sequence[str], count: int) -> list[Path]:
    """Merge the ``count`` shards of ``eval/<label>/<task>`` for each of ``tasks`` into the file
    ``answer_split`` writes and its manifest entry (the parameters' hash included), so that
    ``run_evaluation`` with the same ``EvalConfig`` reuses it. A missing shard is an error naming it."""
    from ..evaluate import write_eval
    paths = []
    for name in tasks:
        records, sidecars = merge_shards(run.eval(label, name), count, agree=("params", "model_key"))
        write_eval(run, label, name, records, sidecars[0]["params"], sidecars[0]["model_key"])
        paths.append(run.eval(label, name))
        log.info("eval/%s/%s: merged %d shards, %d records", label, name, count, len(records))
    return paths


# ---------------------------------------------------------------------------- judging

def run_judging_shard(run: store.Run, shard: Shard, generators: Sequence[str], judges: Sequence[str],
                      tasks: Sequence[str], pairwise_modes: Sequence[str] = ("logprob", "text"),
                      score_modes: Sequence[str] = ("text",), caps: dict[str, int | None] | None = None,
                      seed: int = 0, max_new_tokens: int | None = None, load: Callable[[str], Any] | None = None,
                      force: bool = False) -> list[dict[str, Any]]:
    """Shard ``shard`` of ``judge.run_judging`` (same arguments): each job (pairwise or score, per
    mode) is planned in full, the pair cap applied to ALL pairs, and the shard judges the units
    (pairs, or score batches, both grouped by question) of its contiguous range of the plan's
    questions: exactly the records the unsharded run writes for them. Writes
    ``<task>.<kind>.shard-<i>-of-<n>.jsonl`` (+ sidecar) beside each judgments file; returns one
    summary row per job. ``load(judge_name)``: the judge (default: ``load_llm`` behind the shard's
    own cache). The judge is loaded even when every shard job is complete (its key is part of the
    parameters), but a complete job calls nothing."""
    from ..judge import MAX_NEW_TOKENS, judging_plans, summary_row
    plans = judging_plans(run, generators, judges, tasks, pairwise_modes, score_modes, caps, seed,
                          max_new_tokens or MAX_NEW_TOKENS, load or (lambda name: _shard_llm(run, shard, name)))
    rows = []
    for plan in plans:
        qids = list(dict.fromkeys(plan.question_ids))
        if len(qids) != len(list(itertools.groupby(plan.question_ids))):
            raise ValueError(f"{plan.path.name}: units are not grouped by question, so question ranges would "
                             "reorder them")
        meta = {**_range_meta(_as_json(plan.params), shard, qids), "leftover": plan.leftover}
        records = _completed(plan.path, shard, meta, force)
        if records is None:
            mine = set(meta["question_ids"])
            records = plan.judge([k for k, q in enumerate(plan.question_ids) if q in mine])
            write_shard(plan.path, shard, records, {**meta, "judge_key": plan.judge_key})
        rows.append({**summary_row(plan, records), "shard": shard.tag})
    return rows


def merge_judgments(run: store.Run, generator: str, judge_name: str, task: str, kind: str, mode: str,
                    count: int) -> Path:
    """Merge the ``count`` shards of one judgments file into the file ``judge_pairwise`` /
    ``judge_scores`` writes and its manifest entry (a log-prob ``run_judging`` then reuses it;
    text mode reruns through the call cache: see ``merge_judging``). A missing shard is an error
    naming it."""
    from ..judge import judge_folder, write_judgments
    path = run.judgments(generator, judge_folder(judge_name, mode), task, kind)
    records, sidecars = merge_shards(path, count, agree=("params", "judge_key", "leftover"))
    write_judgments(path, records, sidecars[0]["params"], sidecars[0]["judge_key"], sidecars[0]["leftover"])
    return path


def merge_judging(run: store.Run, count: int, generators: Sequence[str], judges: Sequence[str],
                  tasks: Sequence[str], pairwise_modes: Sequence[str] = ("logprob", "text"),
                  score_modes: Sequence[str] = ("text",)) -> list[Path]:
    """``merge_judgments`` for every job of ``run_judging_shard`` (no model loaded), then, when a
    mode is "text", ``merge_caches``: text-mode ``run_judging`` always asks through the run's
    cache, which then holds every shard's calls, so it rewrites the same file without a model call."""
    jobs = [("pairwise", m) for m in pairwise_modes] + [("score", m) for m in score_modes]
    paths = [merge_judgments(run, generator, judge_name, task, kind, mode, count)
             for judge_name in judges for generator in generators for task in tasks for kind, mode in jobs]
    if any(mode == "text" for _, mode in jobs):
        merge_caches(run, count)
    return paths
