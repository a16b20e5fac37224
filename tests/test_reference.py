"""The reference backend (plain ``transformers.generate``) defines a completion; the fast CPU
engine (``HFModel``) must give the same replies, finishes and log-probs."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from wowlib.llm.base import Decoding, Request
from wowlib.llm.engine.hf import HFModel, HFOptions
from wowlib.llm.models import load_llm
from wowlib.llm.reference import ReferenceModel

PROMPTS = ["Question: which path is shortest?", "Question: pick the best move. Options:\nA. e4\nB. d4\n",
           "short", "Question: " + "graph edge weight node " * 40]


def _chat(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


@pytest.fixture(scope="module")
def pair(tiny_dir: Path) -> tuple[HFModel, ReferenceModel]:
    return HFModel("tiny", tiny_dir, options=HFOptions(dtype="fp32")), ReferenceModel("tiny", tiny_dir)


def _answers(model, requests):
    out = [None] * len(requests)
    for batch in model.plan(requests):
        for i, c in zip(batch, model.run_batch([requests[i] for i in batch])):
            out[i] = c
    return out


@pytest.mark.parametrize("decoding", [Decoding(temperature=0.0, max_new_tokens=48),
                                      Decoding(temperature=0.0, max_new_tokens=96, stop_on_repeat=True),
                                      Decoding(temperature=0.0, max_new_tokens=12, min_new_tokens=12)])
def test_the_engine_gives_the_reference_replies(pair, decoding) -> None:
    """Several samples per prompt (the engine shares their prompt), mixed lengths, greedy."""
    engine, reference = pair
    requests = [Request.chat(_chat(p), decoding, sample_idx=k) for p in PROMPTS for k in range(3)]
    fast, ref = _answers(engine, requests), _answers(reference, requests)
    for request, a, b in zip(requests, fast, ref):
        assert (a.text, a.finish, a.n_tokens) == (b.text, b.finish, b.n_tokens), request
        # before min_new_tokens (benchmarks force lengths) the engine renormalises without the stop
        # tokens it suppresses; the reference keeps the model's own log-probs
        m = decoding.min_new_tokens
        assert a.token_logprobs[m:] == pytest.approx(b.token_logprobs[m:], abs=1e-4)
        if m == 0:
            assert a.mean_logprob == pytest.approx(b.mean_logprob, abs=1e-4)


def test_a_looping_reply_ends_at_the_same_token(tiny_dir) -> None:
    """Both backends, their logits biased towards two tokens: the reply alternates them and both
    end it as "repeat" at the same check."""
    models = [HFModel("tiny", tiny_dir, options=HFOptions(dtype="fp32")), ReferenceModel("tiny", tiny_dir)]
    for model in models:
        favoured = [model.encode(w)[0] for w in (" the", " graph")]
        forward = model.model.forward

        def biased(*args, forward=forward, favoured=favoured, **kwargs):
            out = forward(*args, **kwargs)
            out.logits[..., favoured] += 30.0
            return out
        model.model.forward = biased
    requests = [Request.chat(_chat(p), Decoding(temperature=0.0, max_new_tokens=200, stop_on_repeat=True))
                for p in PROMPTS]
    fast, ref = (_answers(m, requests) for m in models)
    assert [c.finish for c in ref] == ["repeat"] * len(PROMPTS)
    assert [(c.text, c.finish, c.n_tokens) for c in fast] == [(c.text, c.finish, c.n_tokens) for c in ref]


def test_constrained_answers_are_the_same(pair) -> None:
    engine, reference = pair
    requests = [Request.chat(_chat(p), Decoding(temperature=0.0, max_new_tokens=6, constraint=c), prefix=x)
                for p in PROMPTS for c, x in (("letters:ABCD", "The answer is"), ("number", "The total weight is"))]
    for a, b in zip(_answers(engine, requests), _answers(reference, requests)):
        assert (a.text, a.finish, a.n_tokens) == (b.text, b.finish, b.n_tokens)
        assert a.token_logprobs == pytest.approx(b.token_logprobs, abs=1e-4)


def test_choice_logprobs_and_scores_are_the_same(pair) -> None:
    engine, reference = pair
    prompts = [_chat(p) for p in PROMPTS]
    prefixes = ["Preferred output:", "Response 1:\nScore:", "Response 2:\nScore:", "Preferred output:"]
    choices = [f" {d}" for d in range(6)]                     # the judges' choices (wowlib.judge)
    for a, b in zip(engine.choice_logprobs(prompts, prefixes, choices),
                    reference.choice_logprobs(prompts, prefixes, choices)):
        assert a == pytest.approx(b, abs=1e-4)
    continuations = ["The shortest path is 0,1,2.", "A", "", "weight 7"]
    for a, b in zip(engine.score(prompts, continuations), reference.score(prompts, continuations)):
        assert a == pytest.approx(b, abs=1e-4)


def test_reference_samples_are_seeded_and_scored_as_teacher_forcing(pair) -> None:
    """Sampling at temperature 0.7 with top-p: the same batch gives the same answers, and a
    reply's recorded log-probs (at temperature 1) are its teacher-forced ones."""
    _, reference = pair
    requests = [Request.chat(_chat(p), Decoding(temperature=0.7, top_p=0.9, max_new_tokens=20), sample_idx=k)
                for p in PROMPTS for k in range(2)]
    first, again = reference.run_batch(requests), reference.run_batch(requests)
    assert [c.text for c in first] == [c.text for c in again]
    assert len({c.text for c in first}) > 1
    for request, c in zip(requests, first):
        forced = reference.score([request.message_dicts], [c.text])[0]
        if c.finish != "length" or len(forced) != c.n_tokens or c.n_tokens == 0:
            continue                      # re-tokenising decoded text can merge tokens; skip those
        assert sum(forced) / len(forced) == pytest.approx(c.mean_logprob, abs=1e-4)


def test_load_llm_names_the_reference_backend(tiny_dir, monkeypatch) -> None:
    model = load_llm("tiny", backend="reference")
    assert isinstance(model, ReferenceModel) and model.key == "reference:tiny"
    assert model.dtype == torch.float32
