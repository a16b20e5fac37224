"""The transformers backend: a batched sampler built for CPUs (and fine on GPUs).

What makes it fast on a CPU, measured in ``benchmarks/`` (README there):
- batches across questions (up to 256 rows), ordered so that prompts sharing a head are adjacent,
  sized by a KV-cache budget that counts a prompt several rows decode once;
- the samples of a question share their prompt head (the same prompt, or the same question with
  its options in another order): it is prefilled once, and read once per decoding step by
  cascade attention (``_Cascade``) instead of once per sample; heads, and each group's own
  prompt tokens, are prefilled and attended group by group, never padded to another group's length
  (groups whose own tokens are equally wide share one pass and one attention call);
- decoding steps of that cascade attention in a compiled kernel (``decode_kernel``, C++ built on
  first use) that reads each group's head once for all its rows and each row's own tokens, in
  one pass with an online softmax, by AMX tile products in bf16 where the CPU has them; the
  heads' causal prefill in the same kernel; torch's attention where it cannot be built;
- a KV buffer allocated once per batch (no ``torch.cat`` growth per step);
- finished sequences leave the batch at once (early stop per sequence);
- logits only for the positions that are needed (never the full prompt x vocabulary);
- bf16 on CPUs with AMX (``dtype="auto"``), decode attention with ``enable_gqa``; the bf16 linear
  weights reordered once into oneDNN's layout (``packed``) instead of at every call;
- sampling by inverse CDF (one uniform number per row and step) and greedy choice, both
  searching the vocabulary in two levels (blocks, then one block); a drawn token's log-prob read
  off the softmax it was drawn from.
Dynamic int8 quantisation was measured and removed: it moved SmolLM2's log-probs by 1.32 nats on
average (benchmarks/README.md).

Sampling is reproducible per request: each row draws from its own generator, seeded by the
request (messages, decoding, sample index, seed), so an answer does not depend on what else is in
its batch except through floating-point noise, and the cache plans batches so that even that noise
is the same on a rerun.
"""
from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AttentionInterface
from transformers.cache_utils import Cache, DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .. import constrain, cpu
from . import decode_kernel, packed
from ..base import Completion, Message, Request, batches_of, prefixes
from ...seeds import stable_seed
from ..chat import ChatModel, inference_dtype

log = logging.getLogger(__name__)


@dataclass
class HFOptions:
    max_batch: int = 256             # rows decoded together
    token_budget: int = 48_000       # KV-cache token slots per batch (HFModel._kv_tokens)
    min_shared_prefix: int = 32      # prompts sharing at least this many tokens prefill them once
    dtype: str = "auto"              # "auto": bf16 on a GPU that supports it and on a CPU with bf16 (AMX, AVX512-BF16)
    device: str = "auto"
    threads: int | None = None       # torch CPU threads for this process (None: torch's default, all cores)
    attention: str = "auto"          # decoding steps with shared heads: "kernel" (compiled, decode_kernel.py),
                                     # "torch" (flash calls per group), "auto" (the kernel where it builds)
    prepack: bool = True             # bf16 CPU linear weights reordered once for oneDNN (packed.py): same
                                     # numbers, 1.36x end to end; only for a model this class loads itself


class _BufferLayer(DynamicLayer):
    """One layer's KV cache in a buffer allocated once per batch (prompt + max new tokens): a
    decoding step writes one slot, where ``DynamicLayer`` re-allocates and copies the whole cache
    with ``torch.cat`` (measured: ~28% of CPU decode time at 40 rows x 400 tokens)."""

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity, self.length = capacity, 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, heads, _, dim = key_states.shape
        self.device = key_states.device
        self.k_buf = key_states.new_empty(batch, heads, self.capacity, dim)
        self.v_buf = value_states.new_empty(batch, value_states.shape[1], self.capacity, value_states.shape[-1])
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self.capacity:
            raise RuntimeError(f"KV buffer overflow ({end} > {self.capacity})")
        self.k_buf[:, :, self.length:end] = key_states
        self.v_buf[:, :, self.length:end] = value_states
        self.length = end
        self.keys, self.values = self.k_buf[:, :, :end], self.v_buf[:, :, :end]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def place(self, rows: torch.Tensor, start: int, part: DynamicLayer, batch: int) -> None:
        """Write a part prefilled separately (``rows`` of a ``batch``-row buffer, positions from
        ``start``) into this buffer; what no part covers stays zero (finite, then masked)."""
        if not self.is_initialized:
            k, v = part.keys, part.values
            self.k_buf = k.new_zeros(batch, k.shape[1], self.capacity, k.shape[-1])
            self.v_buf = v.new_zeros(batch, v.shape[1], self.capacity, v.shape[-1])
            self.device, self.is_initialized = k.device, True
        end = start + part.keys.shape[-2]
        self.k_buf[rows, :, start:end] = part.keys
        self.v_buf[rows, :, start:end] = part.values
        self.length = max(self.length, end)
        self.keys, self.values = self.k_buf[:, :, :self.length], self.v_buf[:, :, :self.length]

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self.k_buf, self.v_buf = self.k_buf[indices], self.v_buf[indices]
            self.keys, self.values = self.k_buf[:, :, :self.length], self.v_buf[:, :, :self.length]


def native_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices by AMX tiles (Xeon Sapphire Rapids and later):
    there a bf16 model decodes ~2x faster than fp32 (benchmarks/). ``WOW_CPU_ISA`` caps it (``cpu``)."""
    return cpu.has_amx()


def _cpu_has_bf16() -> bool:
    return cpu.has_bf16()


def _sdpa_gqa_decode(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """transformers' SDPA attention, except (1) with shared prompt heads (``wowlib_cascade``),
    cascade attention; (2) a prompt head prefilled alone (``wowlib_causal``), the decode kernel's
    causal prefill where it applies (bf16, head dim 64, AMX: 1.4-1.6x torch's flash attention at
    450-700 tokens); (3) one-token decoding steps of a grouped-query model in bf16: SDPA with
    ``enable_gqa`` (transformers only does so without a mask, a CUDA restriction), 20-40% faster
    on CPU than its packed-query layout for bf16 (benchmarks/)."""
    cascade = kwargs.pop("wowlib_cascade", None)
    if cascade is not None:
        return cascade.attend(module.layer_idx, query, key, value, attention_mask, scaling), None
    # one prompt head prefilled alone (``_prefill_heads``, nothing cached before): causal, no padding
    if kwargs.pop("wowlib_causal", False) and dropout == 0.0 and decode_kernel.prefill_supported(query, key):
        return decode_kernel.causal_prefill(query, key, value, scaling or query.shape[-1] ** -0.5), None
    if (query.shape[2] == 1 and query.dtype == torch.bfloat16 and query.device.type == "cpu" and dropout == 0.0
            and getattr(module, "num_key_value_groups", 1) > 1 and kwargs.get("position_bias") is None
            and kwargs.get("softcap") is None and (attention_mask is None or attention_mask.dtype == torch.bool)):
        out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                                               scale=scaling, enable_gqa=True)
        return out.transpose(1, 2).contiguous(), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


AttentionInterface.register("wowlib_sdpa", _sdpa_gqa_decode)
AttentionMaskInterface.register("wowlib_sdpa", sdpa_mask)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _prefix_groups(ids: list[list[int]], rows: list[int], min_shared: int,
                   reserve: int = 1) -> list[tuple[list[int], int]]:
    """Partition distinct prompts into groups that share a prompt head: [(members, shared
    length)], each member keeping at least ``reserve`` tokens of its own (the positions whose
    logits are read). A group's head is prefilled
    once and read once per decoding step for all its rows (``rows[u]`` rows decode prompt ``u``),
    so a run of prompts sorted by tokens is worth (its rows - 1) x shared tokens; contiguous runs
    are chosen by dynamic programming to maximise that. Runs sharing < ``min_shared`` tokens are
    not worth a separate attention call and stay single (head = their own prompt)."""
    order = sorted(range(len(ids)), key=lambda u: ids[u])
    n = len(order)
    lcp = [_common_prefix(ids[order[k]], ids[order[k + 1]]) for k in range(n - 1)]
    best, cut = [0] * (n + 1), [0] * (n + 1)        # best saving of order[:j], start of its last run
    for j in range(1, n + 1):
        shared, weight = len(ids[order[j - 1]]) - reserve, rows[order[j - 1]]
        best[j], cut[j] = best[j - 1] + ((weight - 1) * shared if shared >= min_shared else 0), j - 1
        for i in range(j - 2, -1, -1):               # run order[i:j]
            shared, weight = min(shared, lcp[i], len(ids[order[i]]) - reserve), weight + rows[order[i]]
            if shared < min_shared:
                break
            if best[i] + (weight - 1) * shared > best[j]:
                best[j], cut[j] = best[i] + (weight - 1) * shared, i
    groups, j = [], n
    while j > 0:
        i = cut[j]
        members = [order[k] for k in range(i, j)]
        shared = min([len(ids[u]) - reserve for u in members] + lcp[i:j - 1])
        groups.append((members, shared))
        j = i
    return groups[::-1]


class _Cascade:
    """Cascade attention over shared prompt heads. Each row (a sample) belongs to a group; the
    group's head (the prompt tokens its rows share) is kept ONCE per layer, the rows' own tokens
    (prompt tail + generated) in the ordinary cache. Attention is computed over the head for all
    rows of a group together and over each row's own tokens, and the two softmax parts merged
    by their log-sum-exp: exactly softmax attention over [head, own tokens], while each decoding
    step reads a head once per group instead of once per row (decoding is memory-bound on CPU,
    and the KV cache is the larger part of what a step reads)."""

    def __init__(self, heads: list[list[tuple[torch.Tensor, torch.Tensor]]], group: torch.Tensor,
                 own_start: list[int], kernel: bool = False) -> None:
        """``heads[layer][g]``: group g's head keys and values in that layer, [1, kv heads,
        head length, dim]; ``group``: each row's group; ``own_start[g]``: the left padding that
        all of group g's rows have in the own-token cache (skipped when attending); ``kernel``:
        decoding steps in the compiled kernel (``decode_kernel``), which fuses head and own tokens."""
        self.heads, self.own_start = heads, own_start
        self.n_groups = len(heads[0])
        self.kernel = kernel
        self.head_table: decode_kernel.HeadTable | None = None      # built at the first decoding step
        self._bias_of: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)
        self.select(group)

    def select(self, group: torch.Tensor) -> None:
        """Set each live row's group (after a batch is expanded or rows leave it). Rows sorted by
        group (as ``_generate`` orders them) make each group's queries one slice, no gather."""
        self.group = group
        self.order = torch.argsort(group, stable=True)
        self.unsort = None if bool((self.order == torch.arange(len(group), device=group.device)).all()) \
            else torch.argsort(self.order)
        self.live = [(g, count) for g, count in enumerate(torch.bincount(group, minlength=self.n_groups).tolist())
                     if count]                                     # (group, rows) of groups with rows
        # adjacent groups whose own tokens start at the same slot attend to them in ONE call (all
        # samples of each question sharing its whole prompt: one call for the batch, not one per question)
        runs: list[list[int]] = []
        first = 0
        for g, count in self.live:
            if runs and runs[-1][2] == self.own_start[g]:
                runs[-1][1] += count
            else:
                runs.append([first, count, self.own_start[g]])
            first += count
        self.own_runs = [(slice(first, first + count), start) for first, count, start in runs]
        self.kernel_groups = decode_kernel.Groups(self.live, self.own_start) if self.kernel else None

    def _own_bias(self, mask: torch.Tensor | None, batch: int, groups: int, length: int, keys: int,
                  dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """Additive mask over the own tokens, [batch, 1, groups x length, keys]: causal + padding,
        repeated for the query heads packed per KV head. Every layer gets the same mask tensor
        in a forward pass: built once per pass."""
        if mask is not None and self._bias_of[0] is mask:
            return self._bias_of[1]
        source = mask
        if mask is None:
            own = torch.ones(length, keys, dtype=torch.bool, device=device).tril(keys - length)
            mask = own[None, None].expand(batch, 1, length, keys)
        mask = mask.expand(batch, 1, length, keys)
        mask = mask[:, :, None].expand(batch, 1, groups, length, keys).reshape(batch, 1, groups * length, keys)
        bias = torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill(~mask, float("-inf"))
        self._bias_of = (source, bias)
        return bias

    def attend(self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               mask: torch.Tensor | None, scale: float | None) -> torch.Tensor:
        if self.kernel and self.unsort is None and decode_kernel.supported(query, key, value, mask):
            if self.head_table is None:
                self.head_table = decode_kernel.HeadTable(self.heads)
            return decode_kernel.cascade_decode(query, key, value, mask, scale or query.shape[-1] ** -0.5,
                                                self.head_table, layer, self.kernel_groups)
        flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        batch, n_q, length, dim = query.shape
        n_kv = key.shape[1]
        per = n_q // n_kv * length                       # queries per KV head and row (GQA packed)
        q = query.reshape(batch, n_kv, per, dim)
        bias = self._own_bias(mask, batch, n_q // n_kv, length, key.shape[2], q.dtype, q.device)
        q_sorted = q if self.unsort is None else q[self.order]
        key, value, bias = (key, value, bias) if self.unsort is None else (key[self.order], value[self.order], bias[self.order])
        # the rows' own tokens (the padding a run of groups shares skipped) ...
        own = [flash(q_sorted[rows], key[rows, :, start:], value[rows, :, start:], attn_mask=bias[rows, :, :, start:],
                     scale=scale) for rows, start in self.own_runs]
        # ... and each group's head, read once for all its rows (real tokens only, no mask)
        heads, first = [], 0
        for g, count in self.live:
            head_k, head_v = self.heads[layer][g]
            q_group = q_sorted[first:first + count].transpose(0, 1).reshape(1, n_kv, count * per, dim)
            o, s = flash(q_group, head_k, head_v, scale=scale)
            heads.append((o.view(n_kv, count, per, dim).transpose(0, 1), s.view(n_kv, count, per).transpose(0, 1)))
            first += count
        out_own, lse_own = own[0] if len(own) == 1 else (torch.cat(column) for column in zip(*own))
        out_head, lse_head = (torch.cat(column) for column in zip(*heads))
        if self.unsort is not None:
            out_own, lse_own, out_head, lse_head = (t[self.unsort] for t in (out_own, lse_own, out_head, lse_head))
        # softmax over [head, own] from its parts: weights exp(lse) / (exp(lse_head) + exp(lse_own))
        w_head = torch.sigmoid(lse_head - lse_own)[..., None]
        out = torch.lerp(out_own.float(), out_head.float(), w_head)
        return out.to(query.dtype).view(batch, n_q, length, dim).transpose(1, 2).contiguous()


VOCAB_BLOCK = 256       # two-level search over the vocabulary: blocks of this many tokens


def _blocks(x: torch.Tensor, fill: float) -> torch.Tensor:
    """[rows, vocab] -> [rows, blocks, VOCAB_BLOCK], padding the last block with ``fill``."""
    pad = -x.shape[-1] % VOCAB_BLOCK
    if pad:
        x = torch.nn.functional.pad(x, (0, pad), value=fill)
    return x.view(x.shape[0], -1, VOCAB_BLOCK)


def _last_positive(cumulative: torch.Tensor) -> torch.Tensor:
    """Per row, the index of the last entry with mass: the first where the running sum is final."""
    return (cumulative < cumulative[:, -1:]).sum(-1)


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Per row, the token whose cumulative mass first exceeds ``u * total`` (``u`` in [0, 1),
    float64): a draw from ``probs``, never a zero-mass token. Two levels (block masses, then one
    block's running sum): a float64 running sum over a 49k vocabulary took 29 ms per decoding step
    at 64 rows, ~15% of a SmolLM2 step; this takes ~3 ms (measured, 1 thread)."""
    rows = torch.arange(probs.shape[0])
    blocks = _blocks(probs, 0.0)
    cdf = blocks.sum(-1).double().cumsum(-1)                       # [rows, blocks]
    target = u * cdf[:, -1]
    block = torch.searchsorted(cdf, target[:, None], right=True).squeeze(-1)
    block = torch.minimum(block, _last_positive(cdf))               # rounding at the very end
    below = torch.where(block > 0, cdf[rows, (block - 1).clamp(min=0)], 0.0)
    inner = blocks[rows, block].double().cumsum(-1)                 # [rows, VOCAB_BLOCK]
    token = torch.searchsorted(inner, (target - below)[:, None], right=True).squeeze(-1)
    return block * VOCAB_BLOCK + torch.minimum(token, _last_positive(inner))


def blocked_argmax(logits: torch.Tensor) -> torch.Tensor:
    """``logits.argmax(-1)`` (the first maximum), from block maxima: ~10x faster than torch's
    argmax over a 49k vocabulary on CPU (8 ms vs 0.9 ms at 64 rows, measured)."""
    rows = torch.arange(logits.shape[0], device=logits.device)
    blocks = _blocks(logits, float("-inf"))
    block = blocks.amax(-1).argmax(-1)
    return block * VOCAB_BLOCK + blocks[rows, block].argmax(-1)


def _row_seed(request: Request) -> int:
    """Each row's own sampling stream, from the request alone (a reply does not depend on its batch)."""
    return stable_seed(json.dumps(request.as_json(), sort_keys=True)) & (2**63 - 1)


class HFModel(ChatModel):
    """The fast CPU engine (this module's docstring) over ``ChatModel``: the same replies as
    ``reference.ReferenceModel`` up to float summation order, several times faster."""

    def __init__(self, name: str, path: str | Path, adapter: str | Path | None = None,
                 stop_strings: Sequence[str] = (), options: HFOptions | None = None,
                 model=None, tokenizer=None) -> None:
        self.options = options or HFOptions()
        if self.options.threads is not None:
            torch.set_num_threads(self.options.threads)
        super().__init__(name, path, adapter, stop_strings, self.options.device, model, tokenizer)
        dtype = self.dtype
        if self.device.type == "cpu" and getattr(self.model.config, "_attn_implementation", None) == "sdpa":
            self.model.set_attn_implementation("wowlib_sdpa")
        self._kernel = self._use_kernel()
        self.packed: Counter = Counter()  # modules replaced by packed.py's stand-ins, by class
        if model is None and self.options.prepack and self.device.type == "cpu" and dtype == torch.bfloat16 \
                and packed.available():
            self.packed = packed.pack_model(self.model)
        self.key = f"hf:{name}" + (f"+adapter:{self.adapter_hash}" if self.adapter_hash else "") + \
                   (":bf16" if dtype == torch.bfloat16 else "")

    def _dtype(self, n_params: int | None) -> torch.dtype:
        return inference_dtype(self.options.dtype, self.device, n_params)

    def _use_kernel(self) -> bool:
        """Whether decoding steps with shared heads run in the compiled kernel (CPU only)."""
        choice = self.options.attention
        if choice not in ("auto", "kernel", "torch"):
            raise ValueError(f"attention must be auto, kernel or torch, got {choice!r}")
        if choice == "torch" or not self._cascade:
            if choice == "kernel":
                raise ValueError("attention='kernel' needs the CPU cascade attention (a CPU model with sdpa)")
            return False
        reason = decode_kernel.unavailable_reason()
        if reason is not None:
            if choice == "kernel":
                raise ValueError(f"attention='kernel': the decode-attention kernel is unavailable: {reason}")
            log.warning("decode-attention kernel unavailable, using torch attention (slower): %s", reason)
        return reason is None

    # ------------------------------------------------------------------ prompts
    # ------------------------------------------------------------------ planning
    @property
    def _cascade(self) -> bool:
        """Whether prompts sharing a head are prefilled once and attended by cascade attention
        (the attention registered here, which CPU models use)."""
        return self.model.config._attn_implementation == "wowlib_sdpa"

    def plan(self, requests: Sequence[Request]) -> list[list[int]]:
        """Group requests by decoding parameters, order them, and cut batches by rows
        (``max_batch``) and by the KV cache they need (``token_budget``, counted as
        ``_kv_tokens`` does: a prompt that several rows share once). A prompt's rows are kept in
        one batch where they fit, since a prompt split across batches is prefilled, and stored,
        once per batch.
        The order: with cascade attention (CPU), by prompt tokens, so that prompts sharing a head
        (the samples of a question; the answers to it, each followed by the same follow-up question)
        are adjacent and land in one batch, where the head is prefilled once; a batch's own-token
        buffer is as wide as its longest own tokens, whatever the prompts' lengths. Otherwise by
        prompt length (identical prompts adjacent), which keeps left padding small."""
        ids = {r.prompt_key: self.encode(self._prompt_text(r)) for r in requests}
        lengths = [len(ids[r.prompt_key]) for r in requests]
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault((r.decoding.max_new_tokens, repr(r.decoding)), []).append(i)
        lead = (lambda i: ids[requests[i].prompt_key]) if self._cascade else (lambda i: -lengths[i])
        batches = []
        for (max_new, _), idx in sorted(groups.items()):
            idx.sort(key=lambda i: (lead(i), requests[i].prompt_key, requests[i].sample_idx))
            batch: list[int] = []
            for piece in self._pieces(idx, requests, lengths, max_new):
                if batch and not self._fits(batch + piece, requests, lengths, max_new):
                    batches.append(batch)
                    batch = []
                batch += piece
            if batch:
                batches.append(batch)
        return batches

    def _pieces(self, idx: list[int], requests: Sequence[Request], lengths: list[int],
                max_new: int) -> list[list[int]]:
        """The runs of requests with the same prompt, each cut into pieces that fit a batch alone
        (a single row that does not fit still makes a piece: it gets a batch of its own)."""
        pieces: list[list[int]] = []
        for k, i in enumerate(idx):
            same = k > 0 and requests[i].prompt_key == requests[idx[k - 1]].prompt_key
            if same and self._fits(pieces[-1] + [i], requests, lengths, max_new):
                pieces[-1].append(i)
            else:
                pieces.append([i])
        return pieces

    def _fits(self, batch: list[int], requests: Sequence[Request], lengths: list[int], max_new: int) -> bool:
        return len(batch) <= self.options.max_batch and \
            self._kv_tokens(batch, requests, lengths, max_new) <= self.options.token_budget

    def _kv_tokens(self, batch: list[int], requests: Sequence[Request], lengths: list[int], max_new: int) -> int:
        """Token slots of KV cache a batch needs, as ``_prefill`` lays it out: with cascade
        attention, a prompt of several rows stores its head once and one own token per row; every
        other prompt (and every prompt without cascade attention) stores all its tokens per row;
        each row's slots are as many as the longest own tokens, plus ``max_new``. Prompts that only
        share a head (options in another order) count as unshared: an upper bound."""
        rows: dict[tuple, int] = {}
        for i in batch:
            rows[requests[i].prompt_key] = rows.get(requests[i].prompt_key, 0) + 1
        length = {requests[i].prompt_key: lengths[i] for i in batch}
        cascade = self._cascade
        shared = {p for p, n in rows.items()
                  if cascade and n > 1 and length[p] - 1 >= self.options.min_shared_prefix}
        own = max(1 if p in shared else length[p] for p in rows)
        return len(batch) * (own + max_new) + sum(length[p] for p in shared)

    # ------------------------------------------------------------------ generation
    @torch.inference_mode()
    def run_batch(self, requests: Sequence[Request]) -> list[Completion]:
        try:
            return self._generate(requests)
        except (RuntimeError, ValueError) as err:        # e.g. out of memory: report, never fake
            log.exception("generation failed for a batch of %d", len(requests))
            return [Completion.failed(f"{type(err).__name__}: {err}") for _ in requests]

    def _generate(self, requests: Sequence[Request]) -> list[Completion]:
        decoding = requests[0].decoding
        if any(r.decoding != decoding for r in requests):
            raise ValueError("a batch must share its decoding parameters (use plan())")
        # Prefill each distinct prompt once (shared heads once per group), then repeat its cache
        # for the rows that decode it.
        prompts = [r.prompt_key for r in requests]
        unique = list(dict.fromkeys(prompts))
        row_of_unique = torch.tensor([unique.index(p) for p in prompts], device=self.device)
        first = {r.prompt_key: r for r in reversed(requests)}
        texts = {p: self._prompt_text(first[p]) for p in unique}
        ids = [self.encode(texts[p]) for p in unique]
        # constrained answers (greedy, a state machine per row over the answer's tokens)
        states = [constrain.RowState(self._answer_plan(r), self._token_classes()) for r in requests] \
            if decoding.constraint is not None else None
        rows = torch.bincount(row_of_unique, minlength=len(unique)).tolist()
        cache, logits, mask, next_pos, cascade = self._prefill(ids, rows, decoding.max_new_tokens)
        extra = {} if cascade is None else {"wowlib_cascade": cascade}
        # rows in the order of their group (then prompt): a group's rows are one slice of the cache
        group_of = cascade.group.tolist() if cascade is not None else [0] * len(unique)
        n = len(requests)
        prompt_of = row_of_unique.tolist()
        active = sorted(range(n), key=lambda i: (group_of[prompt_of[i]], prompt_of[i], i))
        source = row_of_unique[torch.tensor(active, device=self.device)]
        if source.tolist() != list(range(len(unique))):
            cache.batch_select_indices(source)
            if cascade is not None:
                cascade.select(cascade.group[source])
        logits, mask, next_pos = logits[source, -1], mask[source], next_pos[source]

        generators = [torch.Generator(device="cpu").manual_seed(_row_seed(r)) for r in requests]
        tokens: list[list[int]] = [[] for _ in range(n)]
        logps: list[list[float]] = [[] for _ in range(n)]
        finish = ["length"] * n
        stop = torch.tensor(sorted(self.stop_ids), device=self.device)
        # each step's fp32 logits and probabilities in buffers kept for the batch: at 240 rows x 49k
        # tokens a fresh 47 MB tensor is new pages from the OS at every step (.float() 23 ms, softmax
        # 37 ms at one thread; into kept buffers 6 and 18 ms)
        logits_buf, probs_buf = torch.empty_like(logits), torch.empty_like(logits)
        for step in range(decoding.max_new_tokens):
            if step < decoding.min_new_tokens:
                logits[:, stop] = float("-inf")
            if states is None:
                chosen, picked = self._choose(logits, decoding, [generators[i] for i in active],
                                              probs_buf[:len(active)])
                steps = list(zip(chosen.tolist(), picked.tolist()))
            else:
                logprobs = torch.log_softmax(logits.float(), dim=-1)
                steps = [states[i].step(logprobs[row]) for row, i in enumerate(active)]
                chosen = torch.tensor([0 if tok is None else tok for tok, _ in steps], device=self.device)
            keep = []
            for row, (i, (tok, lp)) in enumerate(zip(active, steps)):
                if tok is None:                     # a constrained answer ended before this token
                    finish[i] = "stop"
                    continue
                tokens[i].append(tok)
                logps[i].append(lp)
                ended = "stop" if states is not None and states[i].finished else \
                    self.finish_reason(tokens[i], step, decoding)
                if ended:
                    finish[i] = ended
                else:
                    keep.append(row)
            if not keep:
                break
            if len(keep) < len(active):                # early stop: drop finished rows
                index = torch.tensor(keep, device=self.device)
                cache.batch_select_indices(index)
                if cascade is not None:
                    cascade.select(cascade.group[index])
                mask, next_pos, chosen = mask[index], next_pos[index], chosen[index]
                active = [active[r] for r in keep]
            mask = torch.cat([mask, mask.new_ones(len(active), 1)], dim=-1)
            out = self.model(input_ids=chosen[:, None], attention_mask=mask, position_ids=next_pos[:, None],
                             cache=cache, use_cache=True, **extra)
            logits = logits_buf[:len(active)].copy_(out.logits[:, -1, :])
            next_pos = next_pos + 1
        if states is not None:
            return [self._constrained_completion(requests[i], states[i], tokens[i], logps[i], finish[i])
                    for i in range(n)]
        return [self._completion(tokens[i], logps[i], finish[i]) for i in range(n)]

    def _prefill(self, ids: list[list[int]], rows: list[int], max_new: int, keep: int = 1):
        """Prefill distinct prompts (``rows[u]`` rows will decode prompt ``u``) into fresh KV
        buffers: (cache, logits of the last ``keep`` positions [prompts, keep, vocab], attention
        mask, next position, cascade or None).
        Where prompts share a long head (the samples of a question: the same prompt, or the same
        question with its options in another order), the head is prefilled once per group and
        attended by cascade attention (``_Cascade``); the cache then holds only each row's own
        tokens. Otherwise one left-padded pass."""
        groups = _prefix_groups(ids, rows, self.options.min_shared_prefix, reserve=keep)
        saving = sum((sum(rows[u] for u in members) - 1) * shared for members, shared in groups
                     if shared >= self.options.min_shared_prefix)
        if saving == 0 or min(shared for _, shared in groups) < 1 or not self._cascade:
            input_ids, mask = self._left_pad(ids)
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            cache = self._buffers(input_ids.shape[1] + max_new)
            out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                             cache=cache, use_cache=True, logits_to_keep=keep)
            return cache, out.logits[:, -keep:, :].float(), mask, positions[:, -1] + 1, None
        heads, tails, group_of = [], [None] * len(ids), [0] * len(ids)
        for g, (members, shared) in enumerate(groups):
            heads.append(ids[members[0]][:shared])
            for u in members:
                tails[u], group_of[u] = ids[u][shared:], g
        group = torch.tensor(group_of, device=self.device)
        heads_kv = self._prefill_heads(heads)
        tail_ids, mask = self._left_pad(tails)
        width = tail_ids.shape[1]
        head_length = torch.tensor([len(h) for h in heads], device=self.device)
        positions = head_length[group][:, None] + (mask.cumsum(-1) - 1).clamp(min=0)
        # each group's own tokens prefilled on their own, padded only to the group's longest:
        # groups differ (one question's prompt repeated has no own tokens, its options shuffled
        # have ~150), and one padded pass computed ~35% padding on the sampling workload
        own_start = [width - max(len(tails[u]) for u in members) for members, _ in groups]
        cache = self._buffers(width + max_new)
        logits = []
        # groups whose own tokens are equally wide share one pass (no padding between them): the
        # samples of 24 questions asked 10 times each have one own token each, 1 pass instead of 24
        by_start: dict[int, list[int]] = {}
        for g, start in enumerate(own_start):
            by_start.setdefault(start, []).append(g)
        for start, gs in by_start.items():
            rows = torch.tensor([u for g in gs for u in groups[g][0]], device=self.device)
            local = torch.tensor([k for k, g in enumerate(gs) for _ in groups[g][0]], device=self.device)
            part = self._buffers(width - start)
            alone = _Cascade([[layer[g] for g in gs] for layer in heads_kv], local, [0] * len(gs))
            out = self.model(input_ids=tail_ids[rows, start:], attention_mask=mask[rows, start:],
                             position_ids=positions[rows, start:], cache=part, use_cache=True,
                             logits_to_keep=keep, wowlib_cascade=alone)
            for layer, piece in zip(cache.layers, part.layers):
                layer.place(rows, start, piece, len(ids))
            logits.append((rows, out.logits[:, -keep:, :].float()))
        order = torch.cat([rows for rows, _ in logits])
        logits = torch.cat([part for _, part in logits])[torch.argsort(order)]
        cascade = _Cascade(heads_kv, group, own_start, kernel=self._kernel)
        return cache, logits, mask, positions[:, -1] + 1, cascade

    def _buffers(self, capacity: int) -> Cache:
        """A KV cache of fixed-size buffers, one per layer."""
        return Cache(layers=[_BufferLayer(capacity) for _ in range(self.model.config.num_hidden_layers)])

    def _prefill_heads(self, heads: list[list[int]]) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
        """Prefill each shared head alone (heads differ in length: a padded batch computed ~30%
        padding on the sampling workload): per layer, each head's (keys, values)."""
        caches = []
        extra = {"wowlib_causal": True} if self._kernel else {}      # the kernel's causal prefill (bf16, AMX)
        for head in heads:
            cache = self._buffers(len(head))
            self.model(input_ids=torch.tensor([head], device=self.device), cache=cache, use_cache=True,
                       position_ids=torch.arange(len(head), device=self.device)[None], logits_to_keep=1, **extra)
            caches.append(cache)
        return [[(c.layers[layer].keys, c.layers[layer].values) for c in caches] for layer in range(len(caches[0].layers))]

    @staticmethod
    def _choose(logits: torch.Tensor, decoding, generators,
                probs_out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen tokens, their log-probs under the model at temperature 1): greedy, or one draw
        per row by inverse CDF from the row's own generator (one uniform number per row and step;
        ``torch.multinomial`` draws one exponential per vocabulary entry, ~1.5 ms a row at 49k
        tokens, which was ~8% of decode time). At temperature 1 the log-prob of a drawn token is
        read off the softmax that it was drawn from (a drawn token never has zero mass): one
        pass over rows x vocabulary fewer than log_softmax then exp (each took ~30-45 ms alone
        at 240 rows x 49k tokens, measured). ``probs_out``: a buffer for the probabilities."""
        rows = torch.arange(logits.shape[0], device=logits.device)
        if decoding.greedy:
            chosen = blocked_argmax(logits)
            return chosen, logits[rows, chosen] - torch.logsumexp(logits, dim=-1)
        plain = decoding.temperature == 1.0
        probs = torch.softmax(logits if plain else logits / decoding.temperature, dim=-1, out=probs_out)
        if decoding.top_p < 1.0:
            sorted_p, order = probs.sort(dim=-1, descending=True)
            drop = sorted_p.cumsum(-1) - sorted_p > decoding.top_p
            sorted_p[drop] = 0.0
            kept = torch.zeros_like(probs).scatter(-1, order, sorted_p)
        u = torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in generators])
        chosen = inverse_cdf((kept if decoding.top_p < 1.0 else probs).float().cpu(), u).to(logits.device)
        if plain:
            return chosen, probs[rows, chosen].log()
        return chosen, logits[rows, chosen] - torch.logsumexp(logits, dim=-1)

    # ------------------------------------------------------------------ scoring
    @torch.inference_mode()
    def choice_logprobs(self, prompts: Sequence[Sequence[Message]], prefix: str | Sequence[str],
                        choices: Sequence[str], batch_size: int | None = None) -> list[dict[str, float]]:
        """Log-prob of each choice right after ``prefix`` in the assistant turn, one forward pass
        per distinct prompt. A choice may be several tokens if all choices share all but their
        last token: SmolLM2 spells " 1" as a space token then "1", so the log-prob of " 1" is
        log p(" ") + log p("1" | " ").

        Prompts are batched in token order, so a judge's prompts about one question (the same
        instruction before different answers, or the same five answers before "Response k:",
        given as one call with a prefix per prompt) land together and share their head's prefill
        (``_prefill``, cascade attention).
        ``batch_size`` defaults to 16, or ``max_batch`` if smaller: with ``max_batch=1`` a prompt's values
        do not depend on the other prompts (float noise of the batch's shape), as for decoding."""
        batch_size = batch_size or min(16, self.options.max_batch)
        texts = [self.render(p, x) for p, x in zip(prompts, prefixes(prefix, len(prompts)))]
        if not texts:
            return []
        shared, finals = self._choice_tokens(texts[0], choices)
        keep = len(shared) + 1
        encoded = [tuple(self.encode(t) + shared) for t in texts]
        out: dict[tuple[int, ...], dict[str, float]] = {}
        for batch in batches_of(sorted(set(encoded)), batch_size):
            _, logits, *_ = self._prefill([list(e) for e in batch], [1] * len(batch), 0, keep=keep)
            logprobs = torch.log_softmax(logits, dim=-1)
            for row, e in enumerate(batch):
                head = sum(logprobs[row, j, t].item() for j, t in enumerate(shared))
                out[e] = {c: head + logprobs[row, -1, t].item() for c, t in zip(choices, finals)}
        return [out[e] for e in encoded]

def measure(fn, *args, **kwargs):
    """(result, seconds) of a call."""
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start
