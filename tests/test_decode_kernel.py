"""The compiled decode-attention kernel (wowlib/llm/engine/decode_kernel.py) computes what torch's
cascade attention computes: fp32 to 1e-5 on random data with every edge the sampler produces
(head lengths at block edges, groups larger than a work item, left padding, masked slots, one or
two threads); bf16 within bf16 rounding; and the sampler gives the same tokens and log-probs with
either attention. Where the kernel cannot be built, the options say so."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from wowlib.llm.engine import decode_kernel
from wowlib.llm.base import Decoding, Request
from wowlib.llm.engine.hf import HFModel, HFOptions, _Cascade

REASON = decode_kernel.unavailable_reason()
needs_kernel = pytest.mark.skipif(REASON is not None, reason=f"decode kernel unavailable: {REASON}")


def _case(dtype: torch.dtype, dim: int, seed: int = 0):
    """A decoding step: 5 groups (37 rows in one: more than a work item), heads of 1, 63, 64, 65
    and 200 tokens, own tokens with per-group left padding and masked slots."""
    gen = torch.Generator().manual_seed(seed)
    n_kv, per = 2, 3
    lengths, counts, own_start = [1, 63, 64, 65, 200], [1, 37, 4, 2, 6], [0, 5, 2, 0, 9]
    own, capacity = 30, 40
    batch = sum(counts)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(dtype)

    heads = [[(rand(1, n_kv, n, dim), rand(1, n_kv, n, dim)) for n in lengths] for _ in range(2)]
    group = torch.tensor([g for g, c in enumerate(counts) for _ in range(c)])
    k_buf, v_buf = rand(batch, n_kv, capacity, dim), rand(batch, n_kv, capacity, dim)
    mask = torch.rand(batch, 1, 1, own, generator=gen) > 0.25
    mask[..., -1] = True                                     # the token just written is always attended
    query = rand(batch, n_kv * per, 1, dim)
    return heads, group, own_start, query, k_buf[:, :, :own], v_buf[:, :, :own], mask


def _torch_reference(heads, group, own_start, query, key, value, mask, layer=1):
    cascade = _Cascade(heads, group, own_start)
    return cascade.attend(layer, query, key, value, mask, query.shape[-1] ** -0.5)


@needs_kernel
@pytest.mark.parametrize("dim", [16, 64])
@pytest.mark.parametrize("threads", [1, 2])
def test_kernel_equals_torch_cascade_attention_fp32(dim: int, threads: int) -> None:
    heads, group, own_start, query, key, value, mask = _case(torch.float32, dim)
    reference = _torch_reference(heads, group, own_start, query, key, value, mask)
    kernel = _Cascade(heads, group, own_start, kernel=True)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = kernel.attend(1, query, key, value, mask, dim ** -0.5)
    finally:
        torch.set_num_threads(before)
    assert out.shape == reference.shape == (query.shape[0], 1, query.shape[1], dim)
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)
    # an additive float mask is not the kernel's: torch's attention takes that step
    assert not decode_kernel.supported(query, key, value, torch.zeros(mask.shape))
    # no mask (every own slot attended) and another layer's heads
    torch.testing.assert_close(kernel.attend(0, query, key, value, None, dim ** -0.5),
                               _torch_reference(heads, group, own_start, query, key, value, None, layer=0),
                               atol=1e-5, rtol=1e-5)


@needs_kernel
def test_kernel_in_bf16_is_fp32_attention_rounded() -> None:
    """bf16 inputs: the kernel accumulates in fp32 and rounds once, so it is at least as close to
    the fp32 result on the same (bf16-valued) inputs as torch's bf16 path."""
    heads, group, own_start, query, key, value, mask = _case(torch.bfloat16, 64)
    exact = _torch_reference([[(k.float(), v.float()) for k, v in layer] for layer in heads], group, own_start,
                             query.float(), key.float(), value.float(), mask)
    ours = _Cascade(heads, group, own_start, kernel=True).attend(1, query, key, value, mask, 0.125)
    theirs = _torch_reference(heads, group, own_start, query, key, value, mask)
    assert ours.dtype == torch.bfloat16
    err_ours, err_theirs = (ours.float() - exact).abs().max(), (theirs.float() - exact).abs().max()
    assert err_ours <= 2 ** -7 * exact.abs().max(), err_ours          # one bf16 rounding of the output
    assert err_ours <= err_theirs + 1e-6, (err_ours, err_theirs)


@needs_kernel
def test_sampler_gives_the_same_answers_with_the_kernel(tiny_dir: Path) -> None:
    """Whole batches through the tiny model in fp32: samples sharing a head (the same prompt, and
    one question with its options in other orders), rows leaving at their stop token: the kernel
    and torch's attention give the same texts and log-probs within 1e-4."""
    kernel = HFModel("tiny", tiny_dir, options=HFOptions(dtype="fp32", attention="kernel"))
    plain = HFModel("tiny", tiny_dir, options=HFOptions(dtype="fp32", attention="torch"))
    assert kernel._kernel and not plain._kernel
    shared = "Analyze the following question step by step. Constraints: " + "node edge weight path " * 12
    prompts = [f"{shared}\nOptions: A. {a} B. {b}" for a, b in [(1, 2), (2, 1), (3, 4)]] + ["short question"]
    for decoding in (Decoding(temperature=0.0, max_new_tokens=24), Decoding(temperature=1.0, max_new_tokens=24)):
        requests = [Request.chat([{"role": "user", "content": p}], decoding, sample_idx=i)
                    for p in prompts for i in range(3)]
        ours, theirs = kernel.run_batch(requests), plain.run_batch(requests)
        assert [c.text for c in ours] == [c.text for c in theirs]
        assert all(c.finish != "error" for c in ours)
        for a, b in zip(ours, theirs):
            assert a.token_logprobs == pytest.approx(b.token_logprobs, abs=1e-4)


def test_attention_option_is_checked(tiny_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                     caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(ValueError, match="attention must be auto, kernel or torch"):
        HFModel("tiny", tiny_dir, options=HFOptions(dtype="fp32", attention="flash"))
    monkeypatch.setattr(decode_kernel, "unavailable_reason", lambda: "no C++ compiler (install g++ or set $CXX)")
    with pytest.raises(ValueError, match="kernel is unavailable: no C\\+\\+ compiler"):
        HFModel("tiny", tiny_dir, options=HFOptions(dtype="fp32", attention="kernel"))
    with caplog.at_level(logging.WARNING, logger="wowlib.llm.engine.hf"):
        model = HFModel("tiny", tiny_dir, options=HFOptions(dtype="fp32"))
    assert not model._kernel and "using torch attention" in caplog.text


def test_a_failed_build_names_the_compiler_and_its_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WOW_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("WOW_CPU_ISA", "native")          # the build is what fails here, not a cap
    broken = tmp_path / "cxx"
    broken.write_text("#!/bin/sh\necho 'fatal: no such instruction set' >&2\nexit 1\n")
    broken.chmod(0o755)
    monkeypatch.setenv("CXX", str(broken))
    decode_kernel.compiled.cache_clear()
    decode_kernel.load.cache_clear()
    decode_kernel.unavailable_reason.cache_clear()
    try:
        reason = decode_kernel.unavailable_reason()
    finally:
        decode_kernel.compiled.cache_clear()
        decode_kernel.load.cache_clear()
        decode_kernel.unavailable_reason.cache_clear()
    assert reason is not None and str(broken) in reason and "no such instruction set" in reason
    assert not list(tmp_path.rglob("*.so"))                  # nothing half-built left behind


@needs_kernel
def test_bf16_sampler_with_head_dim_64_agrees_with_torch_attention(tiny_dir: Path) -> None:
    """bf16 and head dim 64: where the CPU has AMX, the kernel reads heads by tile products
    (``wow_paired``) and prefills them by its causal prefill, between torch's own bf16 matmuls and
    attention, which use the same tiles. Torch's forward pass gives the same logits before and after
    the kernel ran (the tiles are left as torch expects them), and whole batches (heads of several
    blocks, options in other orders) give the greedy texts and log-probs of torch's attention up to
    bf16 noise (measured: <= 0.04 nats on the first two tokens of this random model; a broken tile
    product would be off by nats)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    config = AutoConfig.from_pretrained(tiny_dir)
    config.update({"hidden_size": 128, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 64,
                   "initializer_range": 0.1})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16).eval()
    kernel = HFModel("tiny64", tiny_dir, model=model, options=HFOptions(attention="kernel"))
    plain = HFModel("tiny64", tiny_dir, model=model, options=HFOptions(attention="torch"))
    shared = "Analyze the following question step by step. Constraints: " + "node edge weight path " * 30
    prompts = [f"{shared}\nOptions: A. {a} B. {b}" for a, b in [(1, 2), (2, 1), (3, 4)]] + ["short question"]
    requests = [Request.chat([{"role": "user", "content": p}], Decoding(temperature=0.0, max_new_tokens=8),
                             sample_idx=i) for p in prompts for i in range(3)]
    probe = torch.tensor([kernel.encode(shared)])
    with torch.inference_mode():
        before = model(input_ids=probe).logits
    ours = kernel.run_batch(requests)
    with torch.inference_mode():
        assert torch.equal(model(input_ids=probe).logits, before)
    theirs = plain.run_batch(requests)
    assert all(c.finish != "error" for c in ours + theirs)
    assert sum(a.text == b.text for a, b in zip(ours, theirs)) >= len(requests) // 2
    for a, b in zip(ours, theirs):
        assert abs(a.token_logprobs[0] - b.token_logprobs[0]) < 0.01     # after the prefill
        assert abs(a.token_logprobs[1] - b.token_logprobs[1]) < 0.1      # and one decoding step


@needs_kernel
@pytest.mark.parametrize("length", [2, 17, 64, 65, 150])
def test_causal_prefill_equals_torch_flash_attention(length: int) -> None:
    """A prompt head's causal self-attention in bf16 (head dim 64, grouped queries): where the kernel
    takes it, within bf16 rounding of the fp32 result and as close to it as torch's bf16 path."""
    gen = torch.Generator().manual_seed(length)
    query, key, value = (torch.randn(1, n, length, 64, generator=gen).to(torch.bfloat16) for n in (6, 2, 2))
    if not decode_kernel.prefill_supported(query, key):
        pytest.skip("the causal prefill needs AMX tiles (bf16)")
    sdpa = torch.nn.functional.scaled_dot_product_attention
    exact = sdpa(query.float(), key.float().repeat_interleave(3, 1), value.float().repeat_interleave(3, 1),
                 is_causal=True).transpose(1, 2)
    theirs = sdpa(query, key, value, is_causal=True, enable_gqa=True).transpose(1, 2)
    ours = decode_kernel.causal_prefill(query, key, value, 0.125)
    assert ours.shape == exact.shape == (1, length, 6, 64) and ours.dtype == torch.bfloat16
    err_ours, err_theirs = (ours.float() - exact).abs().max(), (theirs.float() - exact).abs().max()
    assert err_ours <= 2 ** -7 * exact.abs().max(), err_ours
    assert err_ours <= 1.5 * err_theirs + 1e-6, (err_ours, err_theirs)
    assert not decode_kernel.prefill_supported(query.float(), key.float())          # fp32: torch's
    assert not decode_kernel.prefill_supported(query[..., :1, :], key)              # a cache before it
