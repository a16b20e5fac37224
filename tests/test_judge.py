"""Judges: prompt filling, verdict/score parsers on boundary text, and one run per judge function
with the tiny model (records written, statuses set, the second call served from the cache)."""
from __future__ import annotations

import pytest

from wowlib import elicit, judge, paths, store
from wowlib.llm.base import Completion
from wowlib.tasks import get_task

# ---------------------------------------------------------------------------- prompts

def test_pairwise_prompt_fills_verbatim():
    text = judge.pairwise_prompt("What is {x}?", "uses {output_2} and {}", "B")
    assert "What is {x}?" in text and "uses {output_2} and {}" in text
    assert "{instruction}" not in text and "{output_1}" not in text
    assert text.index("uses {output_2}") < text.index("## Output 2")
    assert text.startswith(paths.prompt_text("judge_pairwise")[:40])


def test_score_prompt_needs_five():
    text = judge.score_prompt("Q", ["r1", "r2", "r3", "r4", "r5"])
    assert all(f"## Response {k}:\n'''\nr{k}\n'''" in text for k in range(1, 6))
    with pytest.raises(ValueError):
        judge.score_prompt("Q", ["r1", "r2"])


# ---------------------------------------------------------------------------- parsers

@pytest.mark.parametrize("text, expected", [
    ("Output 2 is closer.\nPreferred output: 2.", (2, "ok")),
    ("Preferred output: 1", (1, "ok")),
    ("**Preferred output: 2**", (2, "ok")),
    ("Preferred output: **1**", (1, "ok")),
    ("**Preferred output:** 2", (2, "ok")),
    ("preferred output: output 1", (1, "ok")),
    ("Preferred output: 1\nOn reflection the second is better.\nPreferred output: 2\nThanks.", (2, "ok")),
    ("Preferred output: 2. (Output 2 gets more blanks right.)\nDone.", (2, "ok")),   # not on the last line
    ("Preferred output: 3", (None, "invalid")),
    ("Preferred output: 2\nPreferred output: 1 or 2.", (None, "invalid")),           # template echo last
    ("I prefer the first output.", (None, "missing")),
    ("", (None, "missing")),
    (None, (None, "missing")),
])
def test_parse_pairwise(text, expected):
    assert judge.parse_pairwise(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("\n".join(f"Response {k}: fine.\nScore: {s}" for k, s in enumerate([0, 5, 3, 2, 1], 1)),
     ([0, 5, 3, 2, 1], "ok")),
    ("Score: **4**\n**Score:** 0\nscore: 5\nScore:1\nScore: 2", ([4, 0, 5, 1, 2], "ok")),
    ("Score: 1\nScore: 2\nScore: 3\nScore: 4", (None, "missing")),
    ("Score: <rating>\n" * 5, (None, "missing")),
    ("Score: 1\n" * 6, (None, "extra")),
    ("Score: 1\nScore: 2\nScore: 6\nScore: 4\nScore: 5", (None, "out_of_range")),
    ("Score: 1\nScore: 2\nScore: -1\nScore: 4\nScore: 5", (None, "out_of_range")),
    ("Score: 1\nScore: 2.5\nScore: 3\nScore: 4\nScore: 5", (None, "out_of_range")),
    ("", (None, "missing")),
])
def test_parse_scores(text, expected):
    assert judge.parse_scores(text) == expected


def test_expected_score_and_cap():
    lp = {c: (0.0 if c == " 5" else -1e9) for c in judge.SCORE_CHOICES}
    assert judge.expected_score(lp) == pytest.approx(5.0)
    uniform = {c: -1.0 for c in judge.SCORE_CHOICES}
    assert judge.expected_score(uniform) == pytest.approx(2.5)
    pairs = list(range(20))
    capped = judge.cap_pairs(pairs, 5, seed=1)
    assert len(capped) == 5 and capped == sorted(capped) and capped == judge.cap_pairs(pairs, 5, seed=1)
    assert judge.cap_pairs(pairs, None) == pairs


# ---------------------------------------------------------------------------- with the tiny model

def kc_samples(n_questions: int, n_samples: int) -> list[dict]:
    """Hand-made samples on real KC questions: answers cycle through the options (1-in-4 right)."""
    task = get_task("kc")
    rows = []
    for q in task.splits()["train"][:n_questions]:
        for k in range(n_samples):
            option = k % 4
            rows.append({"task": "kc", "split": "train", "question_id": q.qid, "sample_idx": k,
                         "option_order": [0, 1, 2, 3], "prompt": task.prompt(q), "n_tokens": 5 + k,
                         "response": f"the first blank is person {k} so the answer is {'ABCD'[option]}.",
                         "mean_logprob": -1.0 - k / 10, "extraction": "ABCD"[option], "answer": option,
                         "proxy": q.option_proxies[option], "correct": q.option_proxies[option] == 1.0,
                         "status": "ok", "generator": "gen"})
    rows[1]["status"], rows[1]["answer"], rows[1]["proxy"] = "unparsed", None, None
    return rows


class Broken:
    """A backend whose every call fails."""

    def __init__(self, llm):
        self.name, self.key, self.plan = "broken", "broken", llm.plan

    def run_batch(self, requests):
        return [Completion.failed("boom") for _ in requests]


class Counting:
    """A backend wrapper that counts log-prob calls."""

    def __init__(self, llm):
        self.llm, self.calls = llm, 0
        self.name, self.key = llm.name, llm.key

    def choice_logprobs(self, *args, **kwargs):
        self.calls += 1
        return self.llm.choice_logprobs(*args, **kwargs)


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    from wowlib.llm.models import load_llm
    return load_llm("tiny")


def test_judge_pairwise_with_tiny_model(tiny, tmp_path, data_dir):
    from wowlib.llm.cache import CachedLLM
    run = store.Run(tmp_path / "run")
    samples = kc_samples(2, 5)
    pairs = elicit.wow_pairs(samples)
    assert len(pairs) > 3
    cached = CachedLLM(tiny, run.root / "cache")
    records = judge.judge_pairwise(cached, run, "gen", "tiny", "kc", samples, pairs, cap=3, max_new_tokens=48)
    path = run.judgments("gen", "tiny", "kc", "pairwise")
    assert store.read_jsonl(path) == records and len(records) == 3
    assert cached.stats["computed"] == 6                          # 3 pairs, asked twice (swapped)
    for r in records:
        assert r["status"] in ("ok", "missing", "invalid") and r["swapped_status"] in ("ok", "missing", "invalid")
        assert (r["verdict"] in (1, 2)) == (r["status"] == "ok")
        assert (r["proxy_i"], r["proxy_j"]) != (None, None) and r["i"] < r["j"]
    manifest = store.read_json(path.parent / "manifest.json")
    assert manifest["params"]["kc.pairwise"]["params"]["cap"] == 3

    again = CachedLLM(tiny, run.root / "cache")
    assert judge.judge_pairwise(again, run, "gen", "tiny", "kc", samples, pairs, cap=3, max_new_tokens=48) == records
    assert again.stats["computed"] == 0 and again.stats["cached"] == 6

    # a failed call becomes status "error", never a verdict
    broken = CachedLLM(Broken(tiny), tmp_path / "cache2")
    failed = judge.judge_pairwise(broken, store.Run(tmp_path / "run2"), "gen", "tiny", "kc", samples, pairs,
                                  cap=1, max_new_tokens=8)
    assert failed[0]["status"] == "error" and failed[0]["verdict"] is None and failed[0]["error"] == "boom"

    # log-prob mode: no generation; a rerun with the same parameters is served from the output file
    counting = Counting(tiny)
    lp = judge.judge_pairwise(counting, run, "gen", "tiny", "kc", samples, pairs, mode="logprob", cap=3)
    assert counting.calls == 1 and all(r["status"] in ("ok", "tie") and r["text"] is None for r in lp)
    assert all(r["verdict"] == (1 if r["logprob_1"] > r["logprob_2"] else 2) for r in lp)
    assert judge.judge_pairwise(counting, run, "gen", "tiny", "kc", samples, pairs, mode="logprob", cap=3) == lp
    assert counting.calls == 1
    lp_path = run.judgments("gen", "tiny-logprob", "kc", "pairwise")
    assert store.read_jsonl(lp_path) == lp and store.read_jsonl(path) == records    # both modes kept
    loaded = judge.load_judgments(run, "pairwise")
    assert len(loaded) == len(records + lp) and all(r in loaded for r in records + lp)
    methods = {r["method"] for r in elicit.elicitation_rows(samples, pairwise=judge.load_judgments(run, "pairwise"))}
    assert {"pairwise", "pairwise_logprob"} <= methods
    # the swap-checked variant always has a row; its pairs are those that survived the swap
    rows = elicit.elicitation_rows(samples, pairwise=lp)
    [checked] = [r for r in rows if r["method"] == "pairwise_logprob_consistent" and r["margin"] == 1.0]
    assert checked["n_pairs"] == sum(map(elicit.is_swap_consistent, lp))


def test_judge_scores_with_tiny_model(tiny, tmp_path, data_dir):
    from wowlib.llm.cache import CachedLLM
    run = store.Run(tmp_path / "run")
    samples = kc_samples(1, 7)                # 7 responses (one unparsed): samples 0-4, then 2 left over
    cached = CachedLLM(tiny, run.root / "cache")
    records = judge.judge_scores(cached, run, "gen", "tiny", "kc", samples, max_new_tokens=64)
    path = run.judgments("gen", "tiny", "kc", "score")
    assert store.read_jsonl(path) == records and len(records) == 1
    [r] = records
    assert r["samples"] == [0, 1, 2, 3, 4]          # fixed batches of five, the unparsed sample 1 included
    assert r["status"] in ("ok", "missing", "extra", "out_of_range", "ambiguous", "duplicate", "mislabeled")
    assert (r["scores"] is not None) == (r["status"] == "ok")
    manifest = store.read_json(path.parent / "manifest.json")
    assert manifest["params"]["kc.score"]["stats"]["leftover_unscored"] == 2
    again = CachedLLM(tiny, run.root / "cache")
    assert judge.judge_scores(again, run, "gen", "tiny", "kc", samples, max_new_tokens=64) == records
    assert again.stats["computed"] == 0

    counting = Counting(tiny)
    lp = judge.judge_scores(counting, run, "gen", "tiny", "kc", samples, mode="logprob")
    assert counting.calls == 1              # one call for every (batch, response position): they share the prefill
    assert lp[0]["status"] == "ok" and all(0 <= x <= 5 for x in lp[0]["scores"])
    assert lp[0]["samples"] == r["samples"]                     # the same batches in both modes
    assert judge.judge_scores(counting, run, "gen", "tiny", "kc", samples, mode="logprob") == lp
    assert counting.calls == 1


def test_a_prefix_per_prompt_reads_what_separate_calls_read(tiny):
    """choice_logprobs with one prefix per prompt (the score judge's five "Response k:" reads of
    one prompt, which then share its prefill) gives each read the values of a call of its own."""
    prompts = [[{"role": "user", "content": f"Question {q}: rate the five answers. " + "an answer " * 30}]
               for q in range(2)]
    chats = [p for p in prompts for _ in range(5)]
    prefix = [f"Response {k}:\nScore:" for _ in prompts for k in range(1, 6)]
    together = tiny.choice_logprobs(chats, prefix, list(judge.SCORE_CHOICES))
    alone = [tiny.choice_logprobs([c], x, list(judge.SCORE_CHOICES))[0] for c, x in zip(chats, prefix)]
    assert len(together) == 10
    for a, b in zip(together, alone):
        assert a.keys() == b.keys() and all(abs(a[c] - b[c]) < 1e-4 for c in a)
    assert together[0] != together[1]                            # the prefix is read, not dropped
    with pytest.raises(ValueError, match="3 prefixes for 10 prompts"):
        tiny.choice_logprobs(chats, prefix[:3], list(judge.SCORE_CHOICES))


def test_manifest_keeps_other_entries(tmp_path):
    path_a = tmp_path / "kc.pairwise.jsonl"
    judge._save(path_a, "kc.pairwise", [{"a": 1}], {"mode": "text"}, {}, "k")
    judge._save(tmp_path / "kc.score.jsonl", "kc.score", [{"b": 2}], {"mode": "text"}, {}, "k")
    manifest = store.read_json(tmp_path / "manifest.json")
    assert set(manifest["params"]) == {"kc.pairwise", "kc.score"}
    assert set(manifest["outputs"]) == {"kc.pairwise.jsonl", "kc.score.jsonl"}
    assert judge._is_complete(path_a, "kc.pairwise", {"mode": "text"})
    assert not judge._is_complete(path_a, "kc.pairwise", {"mode": "logprob"})
    path_a.write_text('{"a": 2}\n')                            # edited since: not complete
    assert not judge._is_complete(path_a, "kc.pairwise", {"mode": "text"})


def test_logprob_choices_fall_back_to_the_space_in_the_prefix() -> None:
    """Tokenizers that split ' 1' into ' ' + '1' (SmolLM2, Llama 3) are read after 'prefix ' instead;
    the keys stay ' 1'/' 2'. A tokenizer that fits neither form is a clear error."""
    from wowlib.judge import _choice_logprobs

    class SplitDigits:
        def __init__(self, ok_prefix_end: str) -> None:
            self.ok, self.calls = ok_prefix_end, []

        def choice_logprobs(self, chats, prefix, choices):
            self.calls.append((prefix, tuple(choices)))
            if not prefix.endswith(self.ok):
                raise ValueError("not a single token")
            return [{c: -float(k + 1) for k, c in enumerate(choices)} for _ in chats]

    backend = SplitDigits(": ")
    assert _choice_logprobs(backend, "j", ["p"], "Preferred output:", (" 1", " 2")) == [{" 1": -1.0, " 2": -2.0}]
    assert backend.calls[-1] == ("Preferred output: ", ("1", "2"))
    with pytest.raises(ValueError, match="use mode='text'"):
        _choice_logprobs(SplitDigits("never"), "j", ["p"], "Preferred output:", (" 1", " 2"))
