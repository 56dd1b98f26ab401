"""Shared plumbing for the multi-tensor kernels: int64 tables, rounding, bit helpers.

The launchers take checked arguments (python/worm/ops/ checks every call once, for
every backend) and so hold no checks of their own.

One launch covers many tensors the way torch's fused optimizers do: the host writes a
small int64 table (data pointers, sizes, a program -> (tensor, start) map) and each
program casts the addresses it reads back to typed pointers. The tables depend only on
addresses, sizes and dtypes, so they are cached under exactly that key: a later call
with the same tensors (every optimizer step) reuses the device copy without any
host-to-device transfer, and a stale entry can never be wrong, only unused.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import triton
import triton.language as tl

TL_DTYPE = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}

_CACHE_SIZE = 256
_cache: "OrderedDict[tuple, object]" = OrderedDict()


def cached(key, build):
    """``build()`` once per key (LRU); the value is typically device tables."""
    hit = _cache.get(key)
    if hit is not None:
        _cache.move_to_end(key)
        return hit
    val = build()
    _cache[key] = val
    if len(_cache) > _CACHE_SIZE:
        _cache.popitem(last=False)
    return val


def clear_cache():
    _cache.clear()


class Packer:
    """Lays int64 sections end to end, each padded to 16 bytes.

    The padding keeps every section's address 16-byte aligned, so Triton's pointer
    divisibility specialisation sees the same thing on every call (no recompiles when
    the number of tensors changes parity).
    """

    def __init__(self):
        self._vals: list = []
        self._spans: dict = {}

    def add(self, name, values):
        values = [int(v) for v in values]
        start = len(self._vals)
        self._vals.extend(values)
        if len(self._vals) % 2:
            self._vals.append(0)
        if len(self._vals) == start:  # an empty section still needs a valid pointer
            self._vals.extend((0, 0))
        self._spans[name] = (start, len(values))

    def build(self, device):
        host = torch.tensor(self._vals, dtype=torch.int64)
        if device.type == "cuda":
            # Pinned + non_blocking: a pageable H2D copy would sync the stream.
            dev = host.pin_memory().to(device, non_blocking=True)
        else:
            dev = host
        return {name: dev[s:s + max(n, 1)] for name, (s, n) in self._spans.items()}


def program_map(numels, chunk):
    """(tensor index, start element) of every program, ``chunk`` elements each."""
    tens, starts = [], []
    for i, n in enumerate(numels):
        for s in range(0, n, chunk):
            tens.append(i)
            starts.append(s)
    return tens, starts


def add_dtype_groups(pk, dtypes, sizes, chunk):
    """One launch per dtype: adds each group's program map (``pt_<dtype>``: tensor
    index, ``ps_<dtype>``: start, ``chunk`` units of ``sizes`` each) to the table and
    returns ``[(dtype, number of programs)]``."""
    groups = []
    for dt in sorted(set(dtypes), key=str):
        idx = [i for i, d in enumerate(dtypes) if d == dt]
        pt, ps = program_map([sizes[i] for i in idx], chunk)
        pk.add(f"pt_{dt}", [idx[j] for j in pt])
        pk.add(f"ps_{dt}", ps)
        groups.append((dt, len(pt)))
    return groups


def block_for(device, block):
    """Elements per block: the GPU size, or a big one in the interpreter, where each
    program costs Python overhead and numpy does the per-element work in bulk."""
    return block if device.type == "cuda" else max(block, 1 << 15)


def pick_iters(total, block, levels=((1 << 24, 16), (1 << 20, 4))):
    """Blocks per program: few programs for big sets (fewer atomics, smaller maps),
    one block each for small sets (more parallelism). Few distinct values, so few
    compiled variants."""
    for lim, it in levels:
        if total >= lim:
            return it
    return 1


def launch_ctx(device):
    if device.type == "cuda":
        return torch.cuda.device(device)
    import contextlib
    return contextlib.nullcontext()


# ------------------------------------------------------------------ device helpers
@triton.jit
def round_to(x, DT: tl.constexpr):
    """fp32 value of the nearest DT (round to nearest even), computed with integer ops.

    Written out for bf16 because the Triton interpreter truncates fp32 -> bf16; the
    result is exactly representable in DT, so the final ``.to(DT)`` store is exact on
    every backend.
    """
    if DT == tl.float32:
        return x
    elif DT == tl.bfloat16:
        b = x.to(tl.int32, bitcast=True)
        r = (b + 0x7FFF + ((b >> 16) & 1)) & -65536
        return tl.where(x != x, x, r.to(tl.float32, bitcast=True))
    else:
        return x.to(tl.float16).to(tl.float32)


NONFINITE_KEY = tl.constexpr(0x7F800000)  # keys at or above this are Inf/NaN


@triton.jit
def abs_key(x):
    """The fp32 bit pattern of |x| as int32: non-negative floats order like these ints."""
    return x.to(tl.float32).to(tl.int32, bitcast=True) & 0x7FFFFFFF


@triton.jit
def popcount8(v):
    v = v - ((v >> 1) & 0x55)
    v = (v & 0x33) + ((v >> 2) & 0x33)
    return (v + (v >> 4)) & 0x0F


@triton.jit
def fma(a, b, c, EMULATE: tl.constexpr):
    """a * b + c rounded once, as torch's ``add(x, alpha=...)`` kernels compute it.

    The interpreter's fma is unfused, so there the sum is taken in fp64 (exact product,
    one rounding to fp64, then to fp32: a double rounding that differs from a true
    fma only in vanishingly rare halfway cases).
    """
    if EMULATE:
        return (a.to(tl.float64) * b + c.to(tl.float64)).to(tl.float32)
    else:
        return tl.fma(a, b, c)
