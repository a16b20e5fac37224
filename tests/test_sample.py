"""Phase 1 sampling: the HF backend's decoding loop, the call cache, and resuming after a kill."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from wowlib import store
from wowlib.llm.base import Completion, Decoding, Request
from wowlib.llm.cache import CachedLLM
from wowlib.llm.engine.hf import HFModel, HFOptions


@pytest.fixture(scope="module")
def tiny(tiny_dir: Path) -> HFModel:
    return HFModel("tiny", tiny_dir)


def _chat(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


PROMPTS = ["Question: which path is shortest?", "Question: pick the best move. Options:\nA. e4\nB. d4\n",
           "short", "Question: " + "graph edge weight node " * 40]


def test_greedy_matches_transformers_generate(tiny: HFModel) -> None:
    """Our batched loop (left padding, shared cache, early stop) gives exactly the tokens of
    transformers' own greedy generate, prompt by prompt."""
    requests = [Request.chat(_chat(p), Decoding(temperature=0.0, max_new_tokens=24)) for p in PROMPTS]
    ours = tiny.run_batch(requests)
    for request, completion in zip(requests, ours):
        ids = torch.tensor([tiny.encode(tiny.render(request.message_dicts))])
        out = tiny.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False,
                                  eos_token_id=sorted(tiny.stop_ids), pad_token_id=tiny.tokenizer.pad_token_id)
        new = out[0, ids.shape[1]:].tolist()
        expected = tiny.tokenizer.decode([t for t in new if t not in tiny.stop_ids], skip_special_tokens=True)
        assert completion.text == expected.strip()
        assert completion.finish == ("stop" if new[-1] in tiny.stop_ids else "length")


def test_sampled_logprobs_match_teacher_forcing(tiny: HFModel) -> None:
    """The mean log-prob recorded while sampling equals the teacher-forced log-prob of the same
    tokens (the confidence used for calibration is bookkept correctly)."""
    requests = [Request.chat(_chat(p), Decoding(temperature=1.0, max_new_tokens=20), sample_idx=i)
                for i, p in enumerate(PROMPTS)]
    for request, completion in zip(requests, tiny.run_batch(requests)):
        tokens = completion.token_logprobs[:max(completion.n_tokens, 1)]
        forced = tiny.score([request.message_dicts], [completion.text])[0]
        if len(forced) != completion.n_tokens or completion.n_tokens == 0:
            continue                      # re-tokenising decoded text can merge tokens; skip those
        assert sum(forced) / len(forced) == pytest.approx(completion.mean_logprob, abs=1e-3)
        assert sum(tokens) / len(tokens) == pytest.approx(completion.mean_logprob, abs=1e-9)


def test_sampling_is_reproducible_and_seeded(tiny: HFModel) -> None:
    make = lambda seed: [Request.chat(_chat(p), Decoding(1.0, 16), sample_idx=i, seed=seed)
                         for p in PROMPTS[:2] for i in range(3)]
    first, again, other = (tiny.run_batch(make(0)), tiny.run_batch(make(0)), tiny.run_batch(make(1)))
    assert [c.text for c in first] == [c.text for c in again]
    assert [c.text for c in first] != [c.text for c in other]
    assert len({c.text for c in first[:3]}) > 1           # samples of one prompt differ


def test_shared_prompt_prefill_equals_separate(tiny: HFModel) -> None:
    """N samples sharing one prompt (prefilled once, cache repeated) match the same requests
    decoded in batches of one."""
    requests = [Request.chat(_chat(PROMPTS[0]), Decoding(1.0, 16), sample_idx=i) for i in range(4)]
    together = tiny.run_batch(requests)
    alone = [tiny.run_batch([r])[0] for r in requests]
    assert [c.text for c in together] == [c.text for c in alone]
    for a, b in zip(together, alone):
        assert a.mean_logprob == pytest.approx(b.mean_logprob, abs=1e-4)


def test_plan_is_deterministic_and_bounded(tiny_dir: Path) -> None:
    model = HFModel("tiny", tiny_dir, options=HFOptions(max_batch=3))
    requests = [Request.chat(_chat(p), Decoding(1.0, 8), sample_idx=i) for p in PROMPTS for i in range(2)]
    plan = model.plan(requests)
    assert plan == model.plan(requests)
    assert sorted(i for batch in plan for i in batch) == list(range(len(requests)))
    assert max(len(b) for b in plan) <= 3


class _Flaky:
    """A backend whose first batch fails: errors must come back as errors and stay uncached."""

    name = key = "flaky"

    def __init__(self) -> None:
        self.calls = 0

    def plan(self, requests):
        return [[i] for i in range(len(requests))]

    def run_batch(self, requests):
        self.calls += 1
        if self.calls == 1:
            return [Completion.failed("RuntimeError: boom")]
        return [Completion(text=f"answer {r.sample_idx}", n_tokens=2, mean_logprob=-0.5) for r in requests]


def test_failed_calls_are_reported_not_cached(tmp_path: Path) -> None:
    backend = _Flaky()
    requests = [Request.chat(_chat("q"), sample_idx=i) for i in range(3)]
    first = CachedLLM(backend, tmp_path).generate(requests)
    assert [c.status for c in first] == ["error", "ok", "ok"]
    assert first[0].error == "RuntimeError: boom" and first[0].text == ""
    again = CachedLLM(backend, tmp_path)
    assert len(again) == 2
    second = again.generate(requests)
    assert [c.status for c in second] == ["ok", "ok", "ok"] and again.stats["computed"] == 1


RESUME_SCRIPT = """
import sys
from wowlib import store
from wowlib.llm.cache import CachedLLM
from wowlib.llm.engine.hf import HFModel, HFOptions
from wowlib.llm.tiny import tiny_model_dir
from wowlib.sample import answer_questions, SampleConfig
from wowlib.tasks import get_task
run = store.Run(__import__("pathlib").Path(sys.argv[1]))
llm = CachedLLM(HFModel("tiny", tiny_model_dir(), options=HFOptions(max_batch=2)), run.root / "cache")
config = SampleConfig(generator="tiny", tasks=("kc",), n_questions=5, n_samples=4, max_new_tokens=48)
task = get_task("kc")
records = answer_questions(llm, task, task.questions("train", 5), 4, config.decoding, config.extraction_decoding, 0, "train")
store.write_jsonl(run.samples("tiny", "kc"), records)
"""


def _run_script(run_dir: Path) -> subprocess.Popen:
    """The script in the background, its stderr kept in ``<run_dir>.stderr`` for the failure message."""
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    log = open(f"{run_dir}.stderr", "ab")
    return subprocess.Popen([sys.executable, "-c", RESUME_SCRIPT, str(run_dir)], env=os.environ.copy(),
                            stdout=subprocess.DEVNULL, stderr=log)


def _finish(run_dir: Path) -> None:
    rc = _run_script(run_dir).wait(timeout=300)
    assert rc == 0, f"rerun in {run_dir} exited {rc}:\n" + Path(f"{run_dir}.stderr").read_text(errors="replace")[-3000:]


def _cache_lines(run_dir: Path) -> int:
    files = list((run_dir / "cache").glob("*.jsonl"))
    return sum(1 for f in files for _ in open(f)) if files else 0


@pytest.mark.slow
def test_kill_and_resume_loses_and_duplicates_nothing(tmp_path: Path, tiny_dir: Path, data_dir: Path) -> None:
    """kill -9 a sampling run part-way, rerun it, and compare with an uninterrupted run:
    identical rows, and no duplicate cache keys."""
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    proc = _run_script(killed)
    deadline = time.time() + 120
    while _cache_lines(killed) < 4 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be interrupted"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = _cache_lines(killed)
    assert 0 < partial < 40
    assert not (killed / "samples" / "tiny" / "kc.jsonl").exists()
    for run_dir in (killed, clean):
        _finish(run_dir)
    resumed = store.read_jsonl(killed / "samples" / "tiny" / "kc.jsonl")
    assert resumed == store.read_jsonl(clean / "samples" / "tiny" / "kc.jsonl")
    assert len(resumed) == 20
    keys = [json.loads(line)["key"] for f in (killed / "cache").glob("*.jsonl") for line in f.read_text().splitlines()]
    assert len(keys) == len(set(keys)) == _cache_lines(clean)


def test_plan_counts_a_shared_prompt_once(tiny_dir: Path) -> None:
    """The token budget counts a prompt that several rows decode once (its head is prefilled and
    stored once): N samples of a long prompt fit one batch where N full copies would not, while
    distinct prompts of the same length are still cut by the budget."""
    long = "Question: " + "graph edge weight node " * 40
    distinct = [long + f" variant {k}" for k in range(6)]
    model = HFModel("tiny", tiny_dir)
    length = len(model.encode(model.render(_chat(long))))
    model.options = HFOptions(token_budget=length + 6 * (1 + 8))
    same = [Request.chat(_chat(long), Decoding(1.0, 8), sample_idx=i) for i in range(6)]
    assert model.plan(same) == [list(range(6))]
    assert all(len(b) == 1 for b in model.plan([Request.chat(_chat(p), Decoding(1.0, 8)) for p in distinct]))
    # a budget too small for all six rows: the prompt's rows split, each part sharing its head
    model.options = HFOptions(token_budget=length + 3 * (1 + 8))
    assert [len(b) for b in model.plan(same)] == [3, 3]


def test_kv_cache_allocated_stays_within_the_planned_budget(tiny_dir: Path) -> None:
    """What ``_prefill`` allocates (own-token buffers for every row, one head per group) is at
    most what ``plan`` counted against the budget, for shared, partly shared and distinct prompts."""
    model = HFModel("tiny", tiny_dir, options=HFOptions(token_budget=400))
    requests = [Request.chat(_chat(p), Decoding(1.0, 6), sample_idx=i) for p in PROMPTS for i in range(3)]
    requests += [Request.chat(_chat(PROMPTS[3] + f" option {k}"), Decoding(1.0, 6)) for k in range(3)]
    lengths = [len(model.encode(model.render(r.message_dicts))) for r in requests]
    allocated = []
    prefill = model._prefill

    def spy(ids, rows, *args, **kwargs):
        cache, logits, mask, positions, cascade = prefill(ids, rows, *args, **kwargs)
        heads = sum(k.shape[2] for k, _ in cascade.heads[0]) if cascade is not None else 0
        allocated.append(sum(rows) * cache.layers[0].capacity + heads)   # after rows are expanded
        return cache, logits, mask, positions, cascade

    model._prefill = spy
    plan = model.plan(requests)
    assert len(plan) > 1
    for batch in plan:
        model.run_batch([requests[i] for i in batch])
        assert 0 < allocated[-1] <= model._kv_tokens(batch, requests, lengths, 6)


def test_plan_keeps_prompts_that_share_a_head_together(tiny_dir: Path) -> None:
    """With cascade attention, prompts that share a head (here: two questions, each followed by
    answers of interleaving lengths) are batched by question, where ordering by length would mix
    them and prefill each head in several batches."""
    model = HFModel("tiny", tiny_dir, options=HFOptions(max_batch=3))
    heads = ["Question: " + "graph edge weight node " * 40 + name for name in ("alpha", "beta")]
    prompts = [(h, h + " step" * k) for k in range(1, 7) for h in heads[k % 2:k % 2 + 1]]
    requests = [Request.chat(_chat(p), Decoding(0.0, 4)) for _, p in prompts]
    head_of = [h for h, _ in prompts]
    plan = model.plan(requests)
    assert sorted(i for b in plan for i in b) == list(range(6))
    assert all(len({head_of[i] for i in batch}) == 1 for batch in plan)


# ---------------------------------------------------------------------------- one writer, no silent overwrite

SAMPLER = """
import sys, time
from pathlib import Path
from wowlib import store
from wowlib.llm.base import Completion
from wowlib.sample import SampleConfig, run_sampling


class Slow:
    name = key = "stub"

    def generate(self, requests, desc=""):
        print("sampling", flush=True)
        time.sleep(float(sys.argv[2]))
        return [Completion(text="The answer is A.", n_tokens=4, mean_logprob=-0.5) for _ in requests]


config = SampleConfig(generator="stub", tasks=("kc",), n_questions=2, n_samples=int(sys.argv[3]), max_new_tokens=8)
run_sampling(store.Run(Path(sys.argv[1])), config, llm=Slow())
"""


def _sampler(run_dir: Path, seconds: float, n_samples: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", SAMPLER, str(run_dir), str(seconds), str(n_samples)],
                            env=os.environ.copy(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_two_samplers_in_one_run_the_second_fails_naming_the_first(tmp_path: Path, data_dir: Path) -> None:
    """Two samplers with different settings on one run directory: the second fails at once,
    naming the first (before, both exited 0 and mixed their outputs)."""
    first = _sampler(tmp_path, 4.0, 2)
    assert first.stdout.readline().strip() == "sampling"
    second = _sampler(tmp_path, 0.0, 3)
    _, err = second.communicate(timeout=120)
    assert second.returncode != 0
    assert "RunLockedError" in err and f"pid {first.pid}" in err and "stage 'sample'" in err
    first.communicate(timeout=120)
    assert first.returncode == 0
    records = store.read_jsonl(tmp_path / "samples" / "stub" / "kc.jsonl")
    assert len(records) == 2 * 2                                         # the first sampler's, unmixed


def test_a_rerun_with_other_settings_is_refused_unless_asked(tmp_path: Path, data_dir: Path, monkeypatch) -> None:
    from wowlib.sample import SampleConfig, run_sampling

    class Stub:
        name = key = "stub"
        calls = 0

        def generate(self, requests, desc=""):
            Stub.calls += len(requests)
            return [Completion(text="The answer is A.", n_tokens=4, mean_logprob=-0.5) for _ in requests]

    monkeypatch.delenv(store.OVERWRITE_ENV, raising=False)
    run = store.Run(tmp_path / "run")
    config = SampleConfig(generator="stub", tasks=("kc",), n_questions=2, n_samples=2, max_new_tokens=8)
    run_sampling(run, config, llm=Stub())
    path = run.samples("stub", "kc")
    before, calls = path.read_bytes(), Stub.calls
    run_sampling(run, config, llm=Stub())                                # the same settings: as before
    assert path.read_bytes() == before
    other = SampleConfig(generator="stub", tasks=("kc",), n_questions=2, n_samples=3, max_new_tokens=8)
    with pytest.raises(store.OverwriteError) as err:
        run_sampling(run, other, llm=Stub())
    assert str(path) in str(err.value) and "n_samples: 2 -> 3" in str(err.value)
    assert "overwrite=True" in str(err.value) and "WOW_OVERWRITE=1" in str(err.value)
    assert path.read_bytes() == before and Stub.calls == 2 * calls       # refused before any call
    run_sampling(run, other, llm=Stub(), overwrite=True)
    assert len(store.read_jsonl(path)) == 2 * 3
    monkeypatch.setenv(store.OVERWRITE_ENV, "1")
    run_sampling(run, config, llm=Stub())
    assert path.read_bytes() == before


def test_groups_answered_together_equal_one_call_each(tmp_path: Path, tiny_dir: Path, data_dir: Path) -> None:
    """``answer_groups`` (a model's tasks and splits in one batch, as the evaluation runs them) gives
    each group exactly the records of its own ``answer_questions`` call, in the groups' order.
    ``max_batch=1``: every row decodes alone, so the two paths differ only in their bookkeeping."""
    from wowlib.sample import answer_groups, answer_questions
    from wowlib.tasks import get_task
    model = HFModel("tiny", tiny_dir, options=HFOptions(max_batch=1))
    kc, sp = get_task("kc", data_dir=data_dir), get_task("nlgraph_shortest_path", data_dir=data_dir)
    groups = [(kc, kc.questions("test", 2), "test"), (sp, sp.questions("test", 1), "test"),
              (kc, kc.questions("val", 1), "val")]
    decoding, extraction = Decoding(temperature=1.0, max_new_tokens=12), Decoding(temperature=0.0, max_new_tokens=6)
    together = answer_groups(CachedLLM(model, tmp_path / "a"), groups, 2, decoding, extraction, 0, "constrained")
    alone = [answer_questions(CachedLLM(model, tmp_path / "b"), task, questions, 2, decoding, extraction, 0, split,
                              "constrained") for task, questions, split in groups]
    assert [len(g) for g in together] == [4, 2, 2]
    assert together == alone
    assert [r["task"] for r in together[1]] == ["nlgraph_shortest_path"] * 2 and together[2][0]["split"] == "val"
