"""Inference-only stand-ins for a bf16 model's linear layers on a CPU (the sampler's own models).

``PackedLinear``: ``torch.nn.functional.linear`` on a bf16 CPU tensor hands oneDNN a plain
row-major weight, which oneDNN re-lays out into its AMX tile format on every call: at decoding's
small batches that re-layout is a large part of the call. Reordering each weight once
(``_reorder_linear_weight``, what torch's own compiler does for frozen CPU models) and calling
``_linear_pointwise`` gives the same numbers (bit-identical on SmolLM2-135M), 1.36x end to end on
the default profile's sampling and evaluation workload at two threads (``bench.py --sections
parts``). fp32 weights are left alone: there the packed kernel is another one (not bit-identical)
and gained < 15%. (Fused RMSNorm and SiLU(gate) * up passes were measured here too, 1.03-1.16x end
to end, and removed.)
"""
from __future__ import annotations

from collections import Counter

import torch


def available() -> bool:
    """Whether this torch has oneDNN's packed linear ops."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


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


def pack_model(model: torch.nn.Module) -> Counter:
    """Replace every bf16 CPU ``nn.Linear`` of an inference model by a ``PackedLinear`` (the output
    head too: a tied head keeps its embedding, the head gets its own packed copy). Returns how many
    modules were put in, by class. The model can no longer be trained or saved."""
    replaced: Counter = Counter()

    def visit(module: torch.nn.Module) -> None:
        for name, child in list(module.named_children()):
            if type(child) is torch.nn.Linear and child.weight.dtype == torch.bfloat16 \
                    and child.weight.device.type == "cpu":
                setattr(module, name, PackedLinear(child))
                replaced["PackedLinear"] += 1
            else:
                visit(child)

    visit(model)
    return replaced
