"""The fast CPU paths of the sampler give the answers plain transformers gives.

Kept fast paths (benchmarks/README.md has the measurements):
- bf16 weights and activations on a CPU with AMX (``HFOptions(dtype="auto")`` picks it there);
- a prompt head shared by the samples of a question, prefilled once and attended by cascade
  attention (exact up to fp noise);
- sampling by inverse CDF with one uniform number per row (same distribution as multinomial);
- bf16 linear weights reordered once for oneDNN (``wowlib/llm/engine/packed.py``): the numbers of
  the transformers modules (within 1e-2 logits asserted here).

Tolerances, against plain fp32 transformers on the tiny test model (teacher-forced on fp32's
own greedy continuations, so a single early flip cannot cascade):
- bf16: mean |delta log-prob| of the chosen tokens <= 0.02 nats, max <= 0.25, next-token argmax
  agreement >= 95% (measured here: 0.007 mean, 0.09 max, 99%; on SmolLM2-135M,
  ``benchmarks/bench.py --sections parity``: ~0.03 mean, ~98% agreement). The sampler's recorded
  log-probs vs fp32 teacher forcing: mean <= 0.02.
- Dynamic int8 was removed: harmless on this tiny model but it moved SmolLM2's log-probs by
  >1 nat on average (activation outliers; benchmarks/README.md).
- cascade attention over shared heads in fp32: identical greedy and sampled text, log-probs
  within 1e-4 of the plain path.
(Peak memory of the embedded model is measured by the benchmark, not here.)
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from wowlib.llm.engine import packed
from wowlib.llm.base import Decoding, Request
from wowlib.llm.engine.hf import (
    HFModel,
    HFOptions,
    _cpu_has_bf16,
    _prefix_groups,
    blocked_argmax,
    inverse_cdf,
)

PROMPTS = ["Question: which path is shortest? Options:\nA. 3\nB. 5\nC. 7\nD. 2\n",
           "Question: pick the best move. Options:\nA. e4\nB. d4\nC. Nf3\nD. c4\n",
           "short", "Question: " + "graph edge weight node " * 30,
           "Question: the knowledge person film award prize city river blank constraint?"]
SHARED = "Analyze the following question step by step. Constraints: " + "node edge weight path " * 12
ORDERS = ["Options: A. 1 B. 2 C. 3", "Options: A. 3 B. 1 C. 2", "Options: A. 2 B. 3 C. 1 D. 4"]


def _chat(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


@pytest.fixture(scope="module")
def fp32(tiny_dir: Path) -> HFModel:
    return HFModel("tiny", tiny_dir, options=HFOptions(dtype="fp32"))


@pytest.fixture(scope="module")
def bf16(tiny_dir: Path) -> HFModel:
    if not _cpu_has_bf16():
        pytest.skip("this CPU has no native bf16 (AMX / AVX512-BF16): the bf16 path is never chosen here")
    return HFModel("tiny", tiny_dir, options=HFOptions(dtype="bf16"))


def _greedy_reference(model: HFModel, prompt: str, n: int = 24) -> tuple[list[int], list[int]]:
    """(prompt ids, greedy continuation) from transformers' own ``generate`` in fp32."""
    ids = model.encode(model.render(_chat(prompt)))
    x = torch.tensor([ids])
    out = model.model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False,
                               eos_token_id=sorted(model.stop_ids), pad_token_id=model.tokenizer.pad_token_id)
    return ids, out[0, len(ids):].tolist()


@torch.inference_mode()
def _teacher_forced(model: HFModel, ids: list[int], continuation: list[int]) -> torch.Tensor:
    x = torch.tensor([ids + continuation])
    logits = model.model(input_ids=x).logits[0, len(ids) - 1:-1].float()
    return torch.log_softmax(logits, dim=-1)


def test_bf16_logprobs_and_greedy_tokens_match_fp32(fp32: HFModel, bf16: HFModel) -> None:
    assert bf16.model.dtype == torch.bfloat16 and bf16.key.endswith(":bf16") and fp32.key == "hf:tiny"
    deltas, agree = [], []
    for prompt in PROMPTS:
        ids, cont = _greedy_reference(fp32, prompt)
        ref, fast = _teacher_forced(fp32, ids, cont), _teacher_forced(bf16, ids, cont)
        chosen = torch.tensor(cont)[:, None]
        deltas.append((ref.gather(-1, chosen) - fast.gather(-1, chosen)).abs().squeeze(-1))
        agree.append((ref.argmax(-1) == fast.argmax(-1)).float())
    deltas, agree = torch.cat(deltas), torch.cat(agree)
    assert deltas.mean() <= 0.02 and deltas.max() <= 0.25, (deltas.mean(), deltas.max())
    assert agree.mean() >= 0.95, agree.mean()


def test_bf16_sampler_bookkeeping_matches_fp32_teacher_forcing(fp32: HFModel, bf16: HFModel) -> None:
    """The per-token log-probs the bf16 sampler records are fp32's log-probs of the same tokens,
    within the bf16 tolerance (confidence for calibration is not distorted)."""
    requests = [Request.chat(_chat(p), Decoding(temperature=1.0, max_new_tokens=20), sample_idx=i)
                for i, p in enumerate(PROMPTS)]
    deltas = []
    for request, completion in zip(requests, bf16.run_batch(requests)):
        ids = fp32.encode(fp32.render(request.message_dicts))
        cont = fp32.encode(completion.text)
        if not cont or len(cont) != completion.n_tokens:
            continue                          # re-tokenising decoded text can merge tokens
        ref = _teacher_forced(fp32, ids, cont).gather(-1, torch.tensor(cont)[:, None]).squeeze(-1)
        deltas.append((ref - torch.tensor(completion.token_logprobs[:len(cont)])).abs())
    assert deltas, "no comparable samples"
    assert torch.cat(deltas).mean() <= 0.02


def test_greedy_equals_transformers_generate_in_bf16(bf16: HFModel) -> None:
    """Our batched loop in bf16 still agrees with transformers' generate run on the same bf16 model
    (batching noise only): most prompts give the same greedy text."""
    requests = [Request.chat(_chat(p), Decoding(temperature=0.0, max_new_tokens=24)) for p in PROMPTS]
    same = 0
    for request, completion in zip(requests, bf16.run_batch(requests)):
        _, new = _greedy_reference(bf16, request.messages[0][1])
        expected = bf16.tokenizer.decode([t for t in new if t not in bf16.stop_ids], skip_special_tokens=True)
        same += completion.text == expected.strip()
    assert same >= len(PROMPTS) - 1


def test_packed_bf16_layers_give_the_unpacked_numbers(tiny_dir: Path, bf16: HFModel) -> None:
    """bf16 stand-ins (``packed``): every linear layer replaced, the logits of the transformers
    modules and the same sampled answers and log-probs."""
    if not packed.available():
        pytest.skip("this torch has no oneDNN packed linear ops")
    plain = HFModel("tiny", tiny_dir, options=HFOptions(dtype="bf16", prepack=False))
    n = plain.model.config.num_hidden_layers
    assert bf16.packed == {"PackedLinear": 7 * n + 1}                 # q k v o gate up down, and the head
    assert not plain.packed
    assert not any(type(m) is torch.nn.Linear for m in bf16.model.modules())
    ids = bf16.encode(bf16.render(_chat(PROMPTS[0])))
    with torch.inference_mode():
        a, b = (m.model(input_ids=torch.tensor([ids])).logits.float() for m in (plain, bf16))
    assert torch.allclose(a, b, atol=1e-2, rtol=0), (a - b).abs().max()
    requests = [Request.chat(_chat(p), Decoding(temperature=1.0, max_new_tokens=16), sample_idx=i)
                for i, p in enumerate(PROMPTS)]
    for x, y in zip(plain.run_batch(requests), bf16.run_batch(requests)):
        assert x.text == y.text
        assert x.token_logprobs == pytest.approx(y.token_logprobs, abs=1e-2)


def test_packed_linear_takes_only_bf16_cpu_layers_and_models_passed_in_stay_as_they_are(
        tiny_dir: Path, fp32: HFModel) -> None:
    with pytest.raises(ValueError, match="bf16 CPU linear"):
        packed.PackedLinear(torch.nn.Linear(4, 4))
    assert not fp32.packed
    if not _cpu_has_bf16():
        return
    given = HFModel("tiny", tiny_dir, options=HFOptions(dtype="bf16")).model    # packed by its owner
    fresh = fp32.model.__class__(fp32.model.config).to(torch.bfloat16).eval()
    assert not HFModel("tiny", tiny_dir, model=fresh).packed                    # not ours to change
    assert any(type(m) is torch.nn.Linear for m in fresh.modules())
    assert not any(type(m) is torch.nn.Linear for m in given.modules())


def test_cascade_attention_over_shared_heads_equals_plain_attention(tiny_dir: Path, fp32: HFModel) -> None:
    """Samples of one question (the same prompt several times, or its options in another order)
    share a prompt head that is prefilled once and attended by cascade attention; in fp32 that
    gives the tokens and log-probs of the plain path (every row attending its own full copy)."""
    plain = HFModel("tiny", tiny_dir, options=HFOptions(dtype="fp32", min_shared_prefix=10 ** 9))
    prompts = [f"{SHARED}\n{order}" for order in ORDERS] + PROMPTS[:2]
    ids = [fp32.encode(fp32.render(_chat(p))) for p in prompts]
    groups = _prefix_groups(ids, [2, 2, 2, 1, 1], fp32.options.min_shared_prefix)
    assert max(len(m) for m, _ in groups) == len(ORDERS)       # the three orders share a head
    _, _, _, _, cascade = fp32._prefill(ids, [2, 2, 2, 1, 1], 4)
    assert cascade is not None and plain._prefill(ids, [2, 2, 2, 1, 1], 4)[-1] is None
    # the two prompts decoded alone have one own token each: their own tokens are attended in one call
    assert len(cascade.live) == 3 and len(cascade.own_runs) == 2
    # prompts whose groups are not adjacent (the cascade gathers its rows instead of slicing)
    mixed = [ids[3], ids[0], ids[4], ids[1], ids[2]]
    _, logits, _, _, cascade = fp32._prefill(mixed, [1, 2, 1, 2, 2], 4)
    assert cascade.unsort is not None
    torch.testing.assert_close(logits, plain._prefill(mixed, [1, 2, 1, 2, 2], 4)[1], atol=1e-4, rtol=0)
    for decoding in (Decoding(temperature=0.0, max_new_tokens=16), Decoding(temperature=1.0, max_new_tokens=16)):
        requests = [Request.chat(_chat(p), decoding, sample_idx=i) for p in prompts[:3] for i in range(2)] + \
                   [Request.chat(_chat(p), decoding) for p in prompts[3:]]
        shared, alone = fp32.run_batch(requests), plain.run_batch(requests)
        assert [c.text for c in shared] == [c.text for c in alone]
        for a, b in zip(shared, alone):
            assert a.token_logprobs == pytest.approx(b.token_logprobs, abs=1e-4)


def test_groups_with_equally_wide_own_tokens_share_one_prefill_pass(tiny_dir: Path, fp32: HFModel,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Questions asked several times each (one own token per prompt) prefill their heads one by
    one and then all their own tokens in ONE pass, with the logits of the plain path."""
    plain = HFModel("tiny", tiny_dir, options=HFOptions(dtype="fp32", min_shared_prefix=10 ** 9))
    ids = [fp32.encode(fp32.render(_chat(p))) for p in (PROMPTS[0], PROMPTS[1], PROMPTS[3])]
    calls = []
    forward = type(fp32.model).forward
    monkeypatch.setattr(type(fp32.model), "forward", lambda self, *a, **k: calls.append(1) or forward(self, *a, **k))
    _, logits, _, _, cascade = fp32._prefill(ids, [3, 3, 3], 4)
    assert cascade is not None and len(cascade.live) == 3
    assert len(calls) == 3 + 1                                # three heads, then one pass for all own tokens
    torch.testing.assert_close(logits, plain._prefill(ids, [3, 3, 3], 4)[1], atol=1e-4, rtol=1e-4)


def test_inverse_cdf_sampling_has_the_model_distribution() -> None:
    probs = torch.tensor([0.5, 0.0, 0.3, 0.15, 0.05])
    logits = probs.clamp(min=1e-30).log()
    logits[1] = float("-inf")
    n = 20_000
    generators = [torch.Generator().manual_seed(i) for i in range(n)]
    rows = logits.expand(n, -1)
    chosen, logprobs = HFModel._choose(rows, Decoding(temperature=1.0), generators)
    freq = torch.bincount(chosen, minlength=5).float() / n
    assert freq[1] == 0                                   # a zero-probability token is never drawn
    assert torch.allclose(freq, probs, atol=0.015), freq
    torch.testing.assert_close(logprobs, torch.log_softmax(rows, -1)[torch.arange(n), chosen])
    top, _ = HFModel._choose(rows[:2000], Decoding(temperature=1.0, top_p=0.6), generators[:2000])
    assert set(top.tolist()) <= {0, 2}                    # top-p keeps the smallest set reaching 0.6
    # the log-probs returned are the model's (temperature 1) whatever the decoding
    for decoding in (Decoding(temperature=0.0), Decoding(temperature=0.7), Decoding(temperature=1.0, top_p=0.6)):
        chosen, logprobs = HFModel._choose(rows[:500], decoding, generators[:500])
        torch.testing.assert_close(logprobs, probs.log()[chosen])


def test_two_level_inverse_cdf_picks_the_same_tokens_as_one_running_sum() -> None:
    """The two-level search (block masses, then one block) is the plain inverse CDF: the same
    token for the same uniform number, with a vocabulary that is not a multiple of the block,
    zero-mass tokens and whole zero-mass blocks."""
    gen = torch.Generator().manual_seed(0)
    probs = torch.rand(400, 1000, generator=gen) ** 8
    probs[:, 256:512] = 0.0                                   # a block with no mass
    probs[torch.rand(probs.shape, generator=gen) < 0.3] = 0.0
    probs[:5], probs[5:10] = 0.0, 0.0
    probs[:5, 0], probs[5:10, -1] = 1.0, 1.0                  # all mass on the first / last token
    probs = probs / probs.sum(-1, keepdim=True)
    u = torch.rand(400, generator=gen, dtype=torch.float64)
    u[:3] = 0.0
    cdf = probs.double().cumsum(-1)
    reference = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).squeeze(-1)
    fast = inverse_cdf(probs, u)
    assert (probs[torch.arange(400), fast] > 0).all()
    assert (fast == reference).float().mean() >= 0.995       # differ only where rounding decides
    assert fast[:5].tolist() == [0] * 5 and fast[5:10].tolist() == [999] * 5


def test_blocked_argmax_is_argmax_with_ties_and_a_ragged_last_block() -> None:
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(50, 700, generator=gen)
    logits[0, [3, 600]] = 100.0                               # tie across blocks: the first wins
    logits[1, [520, 521]] = 100.0                             # tie inside a block
    logits[2, 699] = 100.0                                    # in the padded last block
    logits[3, :] = float("-inf")
    logits[3, 650] = 0.0
    assert blocked_argmax(logits).tolist() == logits.argmax(-1).tolist()
    assert blocked_argmax(logits.bfloat16()).tolist() == logits.bfloat16().argmax(-1).tolist()


def test_choice_logprobs_with_shared_heads_equal_plain_forward_passes(tiny_dir: Path, fp32: HFModel) -> None:
    """A judge's prompts about one question share their instruction: prefilled once (cascade
    attention), the choices' log-probs are those of one plain forward pass per prompt."""
    plain = HFModel("tiny", tiny_dir, options=HFOptions(dtype="fp32", min_shared_prefix=10 ** 9))
    prompts = [_chat(f"{SHARED}\nOutput 1: {a}\nOutput 2: {b}") for a, b in
               [("3", "5"), ("5", "3"), ("a long wrong answer 12", "7"), ("7", "a long wrong answer 12")]]
    prompts += [_chat(p) for p in PROMPTS[:2]] + [prompts[0]]          # unrelated ones and a duplicate
    ids = [fp32.encode(fp32.render(p, "Preferred output:")) for p in prompts]
    assert max(shared for _, shared in _prefix_groups(ids, [1] * len(ids), 32, reserve=2)) >= 32
    fast = fp32.choice_logprobs(prompts, "Preferred output:", [" 1", " 2"], batch_size=4)
    slow = plain.choice_logprobs(prompts, "Preferred output:", [" 1", " 2"], batch_size=4)
    assert fast[0] == fast[-1]
    for a, b in zip(fast, slow):
        assert a.keys() == b.keys()
        assert [a[k] for k in a] == pytest.approx([b[k] for k in b], abs=1e-4)
