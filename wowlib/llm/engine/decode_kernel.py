"""The compiled decode-attention kernel (``decode_attention.cpp``): build, load, call.

Built on first use with the system's C++ compiler (``g++``, or ``$CXX``) for this CPU
(``-march=native``) into ``<WOW_CACHE_DIR>/kernels/`` (default ``~/.cache/wowlib``), keyed by the
source (and ``simd_math.h``), the compiler, the flags and the CPU, and loaded through ctypes: no torch headers, ~2 s to build.
Where it cannot be built, ``load()`` says why and the sampler uses torch's attention
(``HFOptions.attention``: "auto" logs the reason, "kernel" raises it). It is used on x86-64 CPUs
with AVX-512 only: elsewhere its portable loops compile, but are neither measured nor tested, so
the sampler keeps torch's attention there.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from functools import cache, lru_cache
from pathlib import Path

import torch

from ...paths import cache_dir

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("decode_attention.cpp")
FLAGS = ["-O3", "-march=native", "-mprefer-vector-width=512", "-fopenmp", "-std=c++20", "-shared", "-fPIC"]
HEAD_DIMS = (16, 32, 64, 128)
DTYPES = {torch.float32: 0, torch.bfloat16: 1}
CHUNK = 16                 # rows per work item: a group of 240 rows still splits over threads


class KernelUnavailable(RuntimeError):
    """The kernel cannot be built or loaded here (no compiler, a failed build, another CPU)."""


def _cpu_key() -> str:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = platform.processor()
    return flags


def _build(compiler: str, source: Path, target: Path) -> None:
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            built = Path(tmp) / target.name
            try:
                proc = subprocess.run([compiler, *FLAGS, str(source), "-o", str(built)], check=False,
                                      capture_output=True, text=True, timeout=300)
            except (OSError, subprocess.TimeoutExpired) as err:
                raise KernelUnavailable(f"cannot run {compiler}: {err}") from err
            if proc.returncode != 0:
                raise KernelUnavailable(f"{compiler} failed to build {source.name}:\n{proc.stderr[-2000:]}")
            os.replace(built, target)                    # atomic: concurrent builds never see half a file
    except OSError as err:
        raise KernelUnavailable(f"cannot write the kernel to {target.parent} (set $WOW_CACHE_DIR): {err}") from err


@cache
def compiled(source: Path) -> ctypes.CDLL:
    """A C++ source of this package built for this CPU (cached, keyed by the source, the headers
    beside it, the compiler, the flags and the CPU) and loaded; raises ``KernelUnavailable`` with
    the reason."""
    if platform.system() != "Linux":
        raise KernelUnavailable(f"built only on Linux (this is {platform.system()})")
    compiler = os.environ.get("CXX") or shutil.which("g++")
    if not compiler:
        raise KernelUnavailable("no C++ compiler (install g++ or set $CXX)")
    headers = b"".join(h.read_bytes() for h in sorted(source.parent.glob("*.h")))     # what it may include
    digest = hashlib.sha256(source.read_bytes() + headers + " ".join([compiler, *FLAGS, _cpu_key()]).encode()
                            ).hexdigest()[:16]
    target = cache_dir() / "kernels" / f"{source.stem}-{digest}.so"
    if not target.exists():
        _build(compiler, source, target)
    try:
        return ctypes.CDLL(str(target))
    except OSError as err:
        raise KernelUnavailable(f"cannot load {target}: {err}") from err


@lru_cache(maxsize=1)
def load() -> ctypes.CDLL:
    """The kernel library, built if needed; raises ``KernelUnavailable`` with the reason."""
    lib = compiled(SOURCE)
    if lib.wow_abi_version() != 2:
        raise KernelUnavailable(f"{SOURCE.name}'s build has another ABI version")
    i64, i32, ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
    lib.wow_cascade_decode.restype = i32
    lib.wow_paired.restype = i32
    lib.wow_causal_prefill.restype = i32
    lib.wow_causal_prefill.argtypes = [ptr, ptr, ptr, i32, i32, i32, ctypes.c_float, ptr, i32]
    lib.wow_paired.argtypes = [i32, i32]
    lib.wow_cascade_decode.argtypes = [i32, ptr, ptr, ptr, i64, i64, ptr, i64, i32, i32, ptr, ptr, ptr, ptr,
                                       ptr, ptr, ptr, i32, i32, i32, ctypes.c_float, ptr, i32, i32]
    return lib


@lru_cache(maxsize=1)
def unavailable_reason() -> str | None:
    """None where the kernel loads and is vectorised for this CPU, else why not (asked once per
    process: a failed build is not retried for every model)."""
    from .. import cpu
    if not cpu.has_avx512():
        return "WOW_CPU_ISA caps this process at AVX2 (or the CPU has no AVX-512): torch's attention is used"
    try:
        lib = load()
    except KernelUnavailable as err:
        return str(err)
    if not lib.wow_vectorised():
        return "this CPU has no AVX-512: the kernel's portable loops would be slower than torch's attention"
    return None


def _ints(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32)


BLOCK = 64                 # keys per block (KB in the kernel)


def _blocked_keys(keys: torch.Tensor) -> torch.Tensor:
    """[1, n_kv, L, d] -> [n_kv, blocks, d, BLOCK]: blocks of keys, each transposed, zero-padded,
    so a query's scores against a block are BLOCK-wide vector operations."""
    _, n_kv, length, dim = keys.shape
    padded = torch.nn.functional.pad(keys[0], (0, 0, 0, -length % BLOCK))
    return padded.view(n_kv, -1, BLOCK, dim).transpose(-1, -2).contiguous()


def _padded_rows(keys: torch.Tensor) -> torch.Tensor:
    """[1, n_kv, L, d] -> [n_kv, blocks * BLOCK, d]: zero-padded to whole blocks (a tile product
    reads 16 keys at a time as they are)."""
    return torch.nn.functional.pad(keys[0], (0, 0, 0, -keys.shape[2] % BLOCK)).contiguous()


def _head_layout(keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A head's keys and values as the kernel reads them: where it reads them by AMX tiles
    (``wow_paired``: bf16, head dim 64, a CPU with AMX), keys as rows and values blocked and
    transposed (the operands of S^T = K Q^T and O^T = V^T P^T); else keys blocked and transposed,
    values as they are."""
    if keys.dtype in DTYPES and load().wow_paired(DTYPES[keys.dtype], keys.shape[-1]):
        return _padded_rows(keys), _blocked_keys(values)
    return _blocked_keys(keys), values.contiguous()


class HeadTable:
    """Per layer, each group's head keys and values (fixed for a batch) laid out for the kernel
    (``_head_layout``) and their pointers; the tensors are kept alive here."""

    def __init__(self, heads: list[list[tuple[torch.Tensor, torch.Tensor]]]) -> None:
        self.tensors = [[_head_layout(k, v) for k, v in layer] for layer in heads]
        self.keys = [torch.tensor([k.data_ptr() for k, _ in layer], dtype=torch.int64) for layer in self.tensors]
        self.values = [torch.tensor([v.data_ptr() for _, v in layer], dtype=torch.int64) for layer in self.tensors]
        self.length = _ints([v.shape[2] for _, v in heads[0]])


class Groups:
    """The live groups of a batch as the kernel reads them: first row, rows, index."""

    def __init__(self, live: list[tuple[int, int]], own_start: list[int]) -> None:
        firsts, first = [], 0
        for _, count in live:
            firsts.append(first)
            first += count
        self.n = len(live)
        self.first, self.count = _ints(firsts), _ints([count for _, count in live])
        self.group, self.own_start = _ints([g for g, _ in live]), _ints(own_start)


def supported(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None) -> bool:
    """Whether the kernel handles this decoding step's shapes, dtypes and mask (a boolean
    [B, 1, 1, L] or none; else torch's attention)."""
    return (query.device.type == "cpu" and query.shape[2] == 1 and query.dtype in DTYPES
            and key.dtype == value.dtype == query.dtype and query.shape[-1] in HEAD_DIMS
            and key.stride() == value.stride() and key.stride(-1) == 1 and key.stride(-2) == key.shape[-1]
            and (mask is None or (mask.dtype == torch.bool and mask.dim() == 4 and mask.shape[1:3] == (1, 1)
                                  and mask.shape[-1] == key.shape[2])))


def cascade_decode(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                   scale: float, heads: HeadTable, layer: int, groups: Groups) -> torch.Tensor:
    """One decoding step's attention: ``query`` [B, n_q, 1, d] over each row's group head and its own
    tokens ``key``/``value`` [B, n_kv, L, d] (a view of the cache buffer) where ``mask`` [B, 1, 1, L]
    (bool, or None: all) allows. Returns [B, 1, n_q, d], softmax attention over [head, own tokens]."""
    batch, n_q, _, dim = query.shape
    n_kv = key.shape[1]
    q = query.contiguous()
    out = torch.empty(batch, 1, n_q, dim, dtype=query.dtype)
    if mask is not None:
        mask = mask.reshape(batch, mask.shape[-1]).contiguous()
    status = load().wow_cascade_decode(
        DTYPES[query.dtype], q.data_ptr(), key.data_ptr(), value.data_ptr(), key.stride(0), key.stride(1),
        None if mask is None else mask.data_ptr(), 0 if mask is None else mask.stride(0), key.shape[2],
        groups.n, groups.first.data_ptr(), groups.count.data_ptr(), groups.own_start.data_ptr(),
        groups.group.data_ptr(), heads.keys[layer].data_ptr(), heads.values[layer].data_ptr(),
        heads.length.data_ptr(), n_kv, n_q // n_kv, dim, float(scale), out.data_ptr(), CHUNK,
        torch.get_num_threads())
    if status != 0:
        raise RuntimeError(f"decode-attention kernel failed with status {status}")
    return out


def prefill_supported(query: torch.Tensor, key: torch.Tensor) -> bool:
    """Whether ``causal_prefill`` takes this prefill: one bf16 sequence, head dim 64, queries for
    every key (nothing cached before), on a CPU where the kernel reads bf16 by AMX tiles."""
    return (query.device.type == "cpu" and query.dtype == key.dtype == torch.bfloat16 and query.shape[0] == 1
            and query.shape[-1] == 64 and query.shape[2] == key.shape[2] > 1
            and query.shape[1] % key.shape[1] == 0 and unavailable_reason() is None
            and bool(load().wow_paired(DTYPES[torch.bfloat16], 64)))


def causal_prefill(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal self-attention of one prompt (``prefill_supported``): ``query`` [1, n_q, L, d], ``key``
    and ``value`` [1, n_kv, L, d]; returns [1, L, n_q, d] (the layout attention modules return)."""
    _, n_q, length, dim = query.shape
    n_kv = key.shape[1]
    q = query[0].reshape(n_kv, n_q // n_kv, length, dim).transpose(1, 2).contiguous()   # [n_kv, L, P, d]
    keys, values = _padded_rows(key), _blocked_keys(value)
    out = torch.empty(1, length, n_q, dim, dtype=query.dtype)
    status = load().wow_causal_prefill(q.data_ptr(), keys.data_ptr(), values.data_ptr(), length, n_kv, n_q // n_kv,
                                       float(scale), out.data_ptr(), torch.get_num_threads())
    if status != 0:
        raise RuntimeError(f"decode-attention kernel: causal prefill returned {status}")
    return out
