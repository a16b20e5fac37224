"""Sharded sampling, evaluation and judging: shards of contiguous question ranges, each with its
own call cache, merged into exactly the bytes of an unsharded run (tiny model, real tasks).

Byte identity needs the same answer per request whichever other requests share its batch. The hf
backend seeds each request's sampling on its own, so the TEXT never depends on the batch, but its
log-probs carry floating-point noise (~1e-7) from the batch's shape (padding width, rows). The
byte-identity test therefore decodes one request per batch (``max_batch=1``: batch-invariant); a
second test shows what default batching changes: nothing but that noise in ``mean_logprob``.
Log-prob judging is a forward pass with the same noise; ``choice_logprobs`` honours ``max_batch``."""
from __future__ import annotations

import itertools
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from wowlib import store
from wowlib.evaluate import EvalConfig, answer_split
from wowlib.judge import judge_folder, run_judging
from wowlib.llm.cache import CachedLLM
from wowlib.sample import SampleConfig, run_sampling
from wowlib.scale.shard import (
    Shard,
    merge_all_samples,
    merge_evaluation,
    merge_judging,
    merge_judgments,
    merge_samples,
    run_evaluation_shard,
    run_judging_shard,
    run_sampling_shard,
    shard_path,
    sidecar_path,
)

TASKS = ("kc", "nlgraph_shortest_path")
CONFIG = SampleConfig(generator="tiny", tasks=TASKS, n_questions=3, n_samples=2, max_new_tokens=16)


# ---------------------------------------------------------------------------- Shard

def test_shards_are_balanced_contiguous_ranges_that_tile() -> None:
    for n in (0, 1, 3, 7, 10):
        for count in (1, 2, 3, 4):
            ranges = [Shard(i, count).bounds(n) for i in range(count)]
            assert ranges[0][0] == 0 and ranges[-1][1] == n
            assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))
            sizes = [stop - start for start, stop in ranges]
            assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
    assert Shard(0, 2).select("abc") == ["a", "b"] and Shard(1, 2).select("abc") == ["c"]
    assert Shard(3, 4).select([1, 2, 3]) == []


def test_shard_specs_and_job_arrays() -> None:
    assert Shard.parse("2/8") == Shard(2, 8) and Shard(2, 8).tag == "shard-2-of-8"
    assert Shard.from_env({}) == Shard(0, 1)
    assert Shard.from_env({"WOW_SHARD": "1/3"}) == Shard(1, 3)
    assert Shard.from_env({"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_COUNT": "8"}) == Shard(4, 8)
    assert Shard.from_env({"SLURM_ARRAY_TASK_ID": "8", "SLURM_ARRAY_TASK_COUNT": "8",
                           "SLURM_ARRAY_TASK_MIN": "1"}) == Shard(7, 8)
    for bad in ("3", "1/0", "2/2", "-1/2"):
        with pytest.raises(ValueError):
            Shard.parse(bad)
    with pytest.raises(TypeError):
        Shard(0.5, 2)
    assert shard_path(Path("s/kc.jsonl"), Shard(0, 2)) == Path("s/kc.shard-0-of-2.jsonl")
    assert sidecar_path(Path("s/kc.jsonl"), Shard(0, 2)) == Path("s/kc.shard-0-of-2.json")


# ---------------------------------------------------------------------------- tiny model, real tasks

@pytest.fixture(scope="module")
def model(tiny_dir):
    """The tiny model decoding one request per batch: answers independent of the batch."""
    from wowlib.llm.models import load_llm
    return load_llm("tiny", max_batch=1)


def _plain_and_sharded(model, root: Path) -> tuple[store.Run, store.Run]:
    plain, sharded = store.Run(root / "plain"), store.Run(root / "sharded")
    run_sampling(plain, CONFIG, llm=CachedLLM(model, plain.root / "cache"))
    for i in range(2):
        summaries = run_sampling_shard(sharded, CONFIG, Shard(i, 2),
                                       llm=CachedLLM(model, sharded.root / "cache" / Shard(i, 2).tag))
        assert [s["questions"] for s in summaries] == [2 - i, 2 - i]          # 3 questions: 2 + 1
    merge_all_samples(sharded, CONFIG, 2)
    return plain, sharded


@pytest.fixture(scope="module")
def runs(model, data_dir, tmp_path_factory) -> tuple[store.Run, store.Run]:
    """The same sampling unsharded (one run dir) and as 2 merged shards (another run dir, so the
    two never share a cache)."""
    return _plain_and_sharded(model, tmp_path_factory.mktemp("shard"))


def test_merged_shards_are_byte_identical_to_an_unsharded_run(runs) -> None:
    plain, sharded = runs
    for task in TASKS:
        merged, expected = sharded.samples("tiny", task), plain.samples("tiny", task)
        assert merged.read_bytes() == expected.read_bytes()
        records = store.read_jsonl(merged)
        assert len(records) == 3 * 2 and {r["status"] for r in records} <= {"ok", "unparsed"}
    manifests = [store.read_json(run.samples("tiny", TASKS[0]).parent / "manifest.json") for run in runs]
    for task in TASKS:
        a, b = (m["entries"][task] for m in manifests)
        assert a["params"] == b["params"] and a["models"] == b["models"] and a["outputs"] == b["outputs"]
    # each shard used its own cache directory
    assert sorted(p.name for p in (sharded.root / "cache").iterdir()) == ["shard-0-of-2", "shard-1-of-2"]


def test_with_default_batching_only_logprob_noise_differs(tiny_dir, data_dir, tmp_path) -> None:
    from wowlib.llm.models import load_llm
    plain, sharded = _plain_and_sharded(load_llm("tiny"), tmp_path)
    for task in TASKS:
        expected, merged = store.read_jsonl(plain.samples("tiny", task)), store.read_jsonl(sharded.samples("tiny", task))
        assert [{**r, "mean_logprob": None} for r in merged] == [{**r, "mean_logprob": None} for r in expected]
        assert [r["mean_logprob"] for r in merged] == pytest.approx([r["mean_logprob"] for r in expected], abs=1e-5)


def test_rerun_is_idempotent(runs, model) -> None:
    _, sharded = runs
    files = {t: shard_path(sharded.samples("tiny", t), Shard(0, 2)) for t in TASKS}
    before = {t: (p.read_bytes(), p.stat().st_mtime_ns) for t, p in files.items()}
    run_sampling_shard(sharded, CONFIG, Shard(0, 2))                # complete: skipped, no model loaded
    assert {t: (p.read_bytes(), p.stat().st_mtime_ns) for t, p in files.items()} == before
    cached = CachedLLM(model, sharded.root / "cache" / "shard-0-of-2")
    run_sampling_shard(sharded, CONFIG, Shard(0, 2), llm=cached, force=True)   # recomputed through the cache
    assert cached.stats["computed"] == 0 and cached.stats["cached"] > 0
    assert {t: p.read_bytes() for t, p in files.items()} == {t: b for t, (b, _) in before.items()}
    merged = sharded.samples("tiny", TASKS[0]).read_bytes()
    merge_samples(sharded, "tiny", TASKS[0], 2)
    assert sharded.samples("tiny", TASKS[0]).read_bytes() == merged


def _copy(run: store.Run, tmp_path: Path) -> store.Run:
    target = tmp_path / "copy"
    shutil.copytree(run.root, target)
    return store.Run(target)


def test_a_missing_shard_is_named(runs, tmp_path) -> None:
    run = _copy(runs[1], tmp_path)
    shard_path(run.samples("tiny", "kc"), Shard(1, 2)).unlink()
    with pytest.raises(FileNotFoundError, match=r"missing kc\.shard-1-of-2\.jsonl"):
        merge_samples(run, "tiny", "kc", 2)
    with pytest.raises(FileNotFoundError, match=r"kc\.shard-2-of-3\.jsonl"):
        merge_samples(run, "tiny", "kc", 3)                     # shards of another split
    sidecar_path(run.samples("tiny", "nlgraph_shortest_path"), Shard(0, 2)).unlink()
    with pytest.raises(FileNotFoundError, match=r"nlgraph_shortest_path\.shard-0-of-2\.json\b"):
        merge_samples(run, "tiny", "nlgraph_shortest_path", 2)


def test_changed_or_mismatched_shards_are_refused(runs, model, tmp_path) -> None:
    run = _copy(runs[1], tmp_path)
    path = shard_path(run.samples("tiny", "kc"), Shard(0, 2))
    path.write_text(path.read_text()[: -40])                    # a partly written shard
    with pytest.raises(ValueError, match=r"kc\.shard-0-of-2\.jsonl: does not match its sidecar"):
        merge_samples(run, "tiny", "kc", 2)
    other = replace(CONFIG, tasks=("kc",), seed=1)              # shard 0 redone with another seed
    run_sampling_shard(run, other, Shard(0, 2), llm=CachedLLM(model, run.root / "cache" / "seed1"))
    with pytest.raises(ValueError, match="'params' differs"):
        merge_samples(run, "tiny", "kc", 2)


# ---------------------------------------------------------------------------- evaluation shards

EVAL = EvalConfig(base_model="tiny", n_questions=3, n_samples=2, max_new_tokens=16, extract_max_new_tokens=8)


@pytest.fixture(scope="module")
def evaluated(model, data_dir, tmp_path_factory) -> tuple[store.Run, store.Run]:
    """D_val + D_test of kc (3 + 3 questions) answered unsharded and as 3 merged shards: shard 1
    holds the last val and the first test question, so a shard may straddle two splits."""
    root = tmp_path_factory.mktemp("eval")
    plain, sharded = store.Run(root / "plain"), store.Run(root / "sharded")
    answer_split(plain, EVAL, "tiny", None, ["kc"], llm=CachedLLM(model, plain.root / "cache"))
    for i in range(3):
        run_evaluation_shard(sharded, EVAL, "tiny", None, ["kc"], Shard(i, 3),
                             llm=CachedLLM(model, sharded.root / "cache" / Shard(i, 3).tag))
    merge_evaluation(sharded, "tiny", ["kc"], 3)
    return plain, sharded


def test_merged_evaluation_equals_unsharded_and_is_reused(evaluated) -> None:
    plain, sharded = evaluated
    merged = sharded.eval("tiny", "kc")
    assert merged.read_bytes() == plain.eval("tiny", "kc").read_bytes()
    records = store.read_jsonl(merged)
    assert [r["split"] for r in records] == ["val"] * 6 + ["test"] * 6
    assert store.read_jsonl(shard_path(merged, Shard(1, 3)))[0]["split"] == "val"       # straddles the splits
    a, b = (store.read_json(run.eval("tiny", "kc").parent / "manifest.json")["entries"]["kc"] for run in evaluated)
    assert a["params"] == b["params"] and a["models"] == b["models"] and a["outputs"] == b["outputs"]
    # the merged file's manifest hash makes answer_split (run_evaluation) reuse it: no model touched
    assert answer_split(sharded, EVAL, "tiny", None, ["kc"], llm=object()) == records


def test_evaluation_shards_rerun_and_missing(evaluated, tmp_path) -> None:
    run = _copy(evaluated[1], tmp_path)
    path = shard_path(run.eval("tiny", "kc"), Shard(2, 3))
    before = (path.read_bytes(), path.stat().st_mtime_ns)
    run_evaluation_shard(run, EVAL, "tiny", None, ["kc"], Shard(2, 3), llm=object())   # complete: no call
    assert (path.read_bytes(), path.stat().st_mtime_ns) == before
    shard_path(run.eval("tiny", "kc"), Shard(1, 3)).unlink()
    with pytest.raises(FileNotFoundError, match=r"missing kc\.shard-1-of-3\.jsonl"):
        merge_evaluation(run, "tiny", ["kc"], 3)


# ---------------------------------------------------------------------------- judging shards

class Guard:
    """The tiny model, counting every generation and log-prob call."""

    def __init__(self, llm) -> None:
        self.llm, self.calls, self.name, self.key = llm, 0, llm.name, llm.key

    def plan(self, requests):
        return self.llm.plan(requests)

    def run_batch(self, requests):
        self.calls += 1
        return self.llm.run_batch(requests)

    def choice_logprobs(self, *args, **kwargs):
        self.calls += 1
        return self.llm.choice_logprobs(*args, **kwargs)


JUDGING = {"generators": ["gen"], "judges": ["tiny"], "tasks": ["kc"], "pairwise_modes": ("logprob", "text"),
           "score_modes": ("logprob", "text"), "caps": {"text": 5}, "max_new_tokens": 12}
JOBS = [("pairwise", "logprob"), ("pairwise", "text"), ("score", "logprob"), ("score", "text")]


def _judged(model, samples: list[dict], root: Path) -> tuple[store.Run, store.Run]:
    """The same judging unsharded (run_judging) and as 3 merged shards, each run with its samples."""
    runs = store.Run(root / "plain"), store.Run(root / "sharded")
    for run in runs:
        store.write_jsonl(run.samples("gen", "kc"), samples)
    run_judging(runs[0], **JUDGING, load=lambda name: CachedLLM(model, runs[0].root / "cache"))
    for i in range(3):
        cache = runs[1].root / "cache" / Shard(i, 3).tag
        run_judging_shard(runs[1], Shard(i, 3), **JUDGING, load=lambda name, cache=cache: CachedLLM(model, cache))
    merge_judging(runs[1], 3, **{k: JUDGING[k] for k in ("generators", "judges", "tasks", "pairwise_modes",
                                                         "score_modes")})
    return runs


@pytest.fixture(scope="module")
def judged(model, data_dir, tmp_path_factory) -> tuple[store.Run, store.Run]:
    """Hand-made kc samples (4 questions x 7: WoW pairs and one score batch per question)."""
    from test_judge import kc_samples
    return _judged(model, kc_samples(4, 7), tmp_path_factory.mktemp("judge"))


def _judgments(run: store.Run, kind: str, mode: str) -> Path:
    return run.judgments("gen", judge_folder("tiny", mode), "kc", kind)


def test_merged_judgments_equal_unsharded_and_are_reused(judged, model) -> None:
    plain, sharded = judged
    for kind, mode in JOBS:
        merged, expected = _judgments(sharded, kind, mode), _judgments(plain, kind, mode)
        assert merged.read_bytes() == expected.read_bytes(), (kind, mode)
        a, b = (store.read_json(p.parent / "manifest.json")["params"][f"kc.{kind}"] for p in (merged, expected))
        assert a == b
    pairs = store.read_jsonl(_judgments(sharded, "pairwise", "text"))
    assert len(pairs) == 5 and len({r["question_id"] for r in pairs}) > 1        # the cap, applied before sharding
    # run_judging on the merged run: log-prob files reused, text mode answered by the merged cache
    guard = Guard(model)
    run_judging(sharded, **JUDGING, load=lambda name: CachedLLM(guard, sharded.root / "cache"))
    assert guard.calls == 0
    for kind, mode in JOBS:
        assert _judgments(sharded, kind, mode).read_bytes() == _judgments(plain, kind, mode).read_bytes()


def test_judging_shards_rerun_and_missing(judged, model, tmp_path) -> None:
    run = _copy(judged[1], tmp_path)
    files = [shard_path(_judgments(run, kind, mode), Shard(1, 3)) for kind, mode in JOBS]
    before = [(p.read_bytes(), p.stat().st_mtime_ns) for p in files]
    guard = Guard(model)
    run_judging_shard(run, Shard(1, 3), **JUDGING, load=lambda name: CachedLLM(guard, tmp_path / "empty-cache"))
    assert guard.calls == 0 and [(p.read_bytes(), p.stat().st_mtime_ns) for p in files] == before
    files[0].unlink()
    with pytest.raises(FileNotFoundError, match=r"missing kc\.pairwise\.shard-1-of-3\.jsonl"):
        merge_judgments(run, "gen", "tiny", "kc", "pairwise", "logprob", 3)
