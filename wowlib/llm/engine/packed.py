"""Inference-only stand-ins for a bf16 Llama model's layers on a CPU (the sampler's own models).

- ``PackedLinear``: ``torch.nn.functional.linear`` on a bf16 CPU tensor hands oneDNN a plain
  row-major weight, which oneDNN re-lays out into its AMX tile format on every call: at decoding's
  small batches that re-layout is a large part of the call. Reordering each weight once
  (``_reorder_linear_weight``, what torch's own compiler does for frozen CPU models) and calling
  ``_linear_pointwise`` gives the same numbers (bit-identical on SmolLM2-135M) 1.15x faster in
  prefill and 1.25-1.3x in a decoding step at 80-240 rows on one thread (1.1x at two;
  ``benchmarks/``). fp32 weights are left alone: there the packed kernel is another one (not
  bit-identical) and gained < 15%.
- ``PackedMLP``: a ``LlamaMLP`` whose gate and up projections are one packed matmul (the same
  numbers: each output column is its own dot product) followed by one fused SiLU(gate) * up pass;
- ``FusedRMSNorm``: a ``LlamaRMSNorm`` in one pass instead of eight torch ops.
  The two fused passes (``fused_ops.cpp``, compiled like the decode kernel) do torch's arithmetic in
  torch's precision: outputs differ only where a float sum's order moves a value across a bf16
  rounding boundary. torch's bf16 element-wise ops were measured at 77 us (RMSNorm) and 100-120 us
  (SiLU * up) at 80 rows, against 22 and 84 us fused; ~4x and ~1.5x at 1,500 prompt tokens.
"""
from __future__ import annotations

import ctypes
import logging
from collections import Counter
from functools import lru_cache
from pathlib import Path

import torch

from . import decode_kernel

log = logging.getLogger(__name__)

FUSED_SOURCE = Path(__file__).with_name("fused_ops.cpp")


def available() -> bool:
    """Whether this torch has oneDNN's packed linear ops."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


@lru_cache(maxsize=1)
def fused_ops() -> ctypes.CDLL | None:
    """The fused element-wise passes, or None (logged once) where they cannot be built or are not
    vectorised for this CPU (their portable loops are slower than torch's)."""
    from .. import cpu
    if not cpu.has_avx512():
        log.info("fused RMSNorm / SiLU passes off: no AVX-512 here (or WOW_CPU_ISA caps it), using torch's ops")
        return None
    try:
        lib = decode_kernel.compiled(FUSED_SOURCE)
    except decode_kernel.KernelUnavailable as err:
        log.info("fused RMSNorm / SiLU passes unavailable, using torch's ops: %s", err)
        return None
    if lib.wow_fused_abi_version() != 1 or not lib.wow_fused_vectorised():
        log.info("fused RMSNorm / SiLU passes not vectorised for this CPU, using torch's ops")
        return None
    i64, i32, ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
    lib.wow_rms_norm.argtypes = [ptr, ptr, ptr, i64, i32, ctypes.c_float, i32]
    lib.wow_silu_mul.argtypes = [ptr, ptr, i64, i32, i32]
    return lib


def _bf16_cpu(x: torch.Tensor, what: str) -> torch.Tensor:
    if x.dtype != torch.bfloat16 or x.device.type != "cpu":
        raise ValueError(f"{what} takes bf16 CPU tensors, got {x.dtype} on {x.device}")
    return x.contiguous()


class PackedLinear(torch.nn.Module):
    """An inference-only stand-in for a bf16 ``nn.Linear``: the weight reordered once."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        if linear.weight.dtype != torch.bfloat16 or linear.weight.device.type != "cpu":
            raise ValueError(f"PackedLinear takes a bf16 CPU linear layer, got {linear.weight.dtype} "
                             f"on {linear.weight.device}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), None)
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class PackedMLP(torch.nn.Module):
    """``down(silu(gate(x)) * up(x))`` with gate and up as one packed matmul and one fused pass."""

    def __init__(self, mlp: torch.nn.Module, ops: ctypes.CDLL) -> None:
        super().__init__()
        self.width = mlp.gate_proj.out_features
        both = torch.nn.Linear(mlp.gate_proj.in_features, 2 * self.width, bias=False, dtype=torch.bfloat16)
        both.weight.data = torch.cat([mlp.gate_proj.weight.detach(), mlp.up_proj.weight.detach()])
        self.gate_up, self.down_proj, self.ops = PackedLinear(both), PackedLinear(mlp.down_proj), ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = _bf16_cpu(self.gate_up(x), "PackedMLP")
        hidden = torch.empty(*gate_up.shape[:-1], self.width, dtype=torch.bfloat16)
        self.ops.wow_silu_mul(gate_up.data_ptr(), hidden.data_ptr(), gate_up.numel() // (2 * self.width),
                              self.width, torch.get_num_threads())
        return self.down_proj(hidden)


class FusedRMSNorm(torch.nn.Module):
    """``LlamaRMSNorm`` in one pass (bf16)."""

    def __init__(self, norm: torch.nn.Module, ops: ctypes.CDLL) -> None:
        super().__init__()
        self.weight = _bf16_cpu(norm.weight.detach(), "FusedRMSNorm")
        self.eps, self.ops = float(norm.variance_epsilon), ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, dim = _bf16_cpu(x, "FusedRMSNorm"), self.weight.numel()
        if x.shape[-1] != dim:
            raise ValueError(f"FusedRMSNorm of width {dim} got inputs of shape {tuple(x.shape)}")
        out = torch.empty_like(x)
        self.ops.wow_rms_norm(x.data_ptr(), self.weight.data_ptr(), out.data_ptr(), x.numel() // dim, dim,
                              self.eps, torch.get_num_threads())
        return out


def _fusable_mlp(module: torch.nn.Module) -> bool:
    from transformers.models.llama.modeling_llama import LlamaMLP
    return (type(module) is LlamaMLP and module.config.hidden_act == "silu" and not module.config.mlp_bias
            and all(type(getattr(module, name)) is torch.nn.Linear and getattr(module, name).weight.dtype
                    == torch.bfloat16 for name in ("gate_proj", "up_proj", "down_proj")))


def _fusable_norm(module: torch.nn.Module) -> bool:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    return type(module) is LlamaRMSNorm and module.weight.dtype == torch.bfloat16 and module.weight.device.type == "cpu"


def pack_model(model: torch.nn.Module, fuse: bool = True) -> Counter:
    """Replace a bf16 CPU inference model's Llama MLPs and RMSNorms by the fused stand-ins (with
    ``fuse``, where ``fused_ops`` builds), then every remaining bf16 ``nn.Linear`` by a
    ``PackedLinear`` (the output head too: a tied head keeps its embedding, the head gets its own
    packed copy). Returns how many modules of each stand-in class were put in. The model can no
    longer be trained or saved."""
    replaced: Counter = Counter()
    ops = fused_ops() if fuse else None

    def stand_in(child: torch.nn.Module) -> torch.nn.Module | None:
        if ops is not None and _fusable_mlp(child):
            return PackedMLP(child, ops)
        if ops is not None and _fusable_norm(child):
            return FusedRMSNorm(child, ops)
        if type(child) is torch.nn.Linear and child.weight.dtype == torch.bfloat16 and child.weight.device.type == "cpu":
            return PackedLinear(child)
        return None

    def visit(module: torch.nn.Module) -> None:
        for name, child in list(module.named_children()):
            new = stand_in(child)
            if new is None:
                visit(child)
            else:
                setattr(module, name, new)
                replaced[type(new).__name__] += 1

    visit(model)
    return replaced
