"""The five ops of worm, ``torch.ops.worm.*``: the one contract every backend meets.

This module owns the ops: their schemas, one documented Python wrapper each, the one
set of input checks (the same exception type for the same misuse on every backend)
and a fake kernel per op, so ``torch.compile`` and ``torch.export`` trace them as
single nodes. The semantics are in docs/ops.md and docs/method.md; the oracle is
:mod:`worm.reference`.

Implementations register per device behind the schema (see :mod:`worm._backends`):
the C++ kernels (``worm._C``) on CPU when built, Triton or the CUDA kernels on CUDA,
the pure-PyTorch reference as the fallback, ``WORM_BACKEND`` to force one. The ops
exist, and compute, even when nothing native is built.

Exceptions, identical on every backend (raised before any backend runs):

* ``TypeError``  a dtype the op does not take (weights not fp32/bf16/fp16, a window
  or packed mask not uint8, thresholds not fp32), a sparse tensor, a non-tensor;
* ``ValueError`` sizes or counts that do not fit together, tensors on different
  devices, empty tensors or lists, k out of range, an unknown scope, an in-place
  target that is not contiguous;
* ``IndexError`` a window row (``head``) outside the window;
* ``RuntimeError`` the forced backend (``WORM_BACKEND``) cannot run on the device.

Read-only inputs may have any strided layout (they are made contiguous first);
in-place targets (``window``, truncated grads, params, momentum buffers) must be
contiguous, since the kernels write flat memory.

Why the Triton path is an opaque op under ``torch.compile`` rather than a
``torch.library.triton_op``: the kernels of ``worm_kernels/`` take one int64 table
of raw data pointers for a whole list of tensors (one launch for many tensors, as
torch's fused optimizers do). Such a table cannot be built from FakeTensors, and
Inductor could not see the tensors the kernels read and write through it, so
``wrap_triton`` cannot trace them; the fake kernels below make each op one node of a
``fullgraph=True`` graph instead.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from . import _backends

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_WINDOW = 64  # rows of the mask window (the Triton kernel keeps per-row counts in registers)

SCHEMAS = {
    "select_thresholds":
        "select_thresholds(Tensor[] tensors, int[] ks, str scope) -> (Tensor, Tensor)",
    "mask_update_":
        "mask_update_(Tensor[] tensors, Tensor thr, Tensor(a!) window, int head) -> Tensor",
    # select_thresholds, then mask_update_ with its thresholds, as one step; where the
    # set holds NaN/Inf the window is left as it was and the counts are 0.
    "sample_mask_":
        "sample_mask_(Tensor[] tensors, int[] ks, str scope, Tensor(a!) window, int head) "
        "-> (Tensor, Tensor, Tensor)",
    "truncate_":
        "truncate_(Tensor(a!)[] grads, Tensor[] keep_bits, float r) -> ()",
    # momentum_buffers: one per param (allocated by the caller) or none when momentum
    # == 0; fresh[i] != 0 marks a buffer this step initialises, as torch.optim.SGD's
    # first step does. csrc/register.cpp declares the same schemas for worm_native.
    "sgd_step_":
        "sgd_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, "
        "int[] fresh, Tensor?[] keep_bits, *, float r, float lr, float weight_decay, "
        "float momentum, float dampening, bool nesterov, bool maximize) -> ()",
}


# ------------------------------------------------------------------ the checks
# Written with torch._check_* so the same code runs in the real kernels (plain bools)
# and in the fake kernels (symbolic sizes under torch.compile).
# A plain True (every passing check in a real kernel) skips torch._check, whose
# symbolic-shape machinery costs microseconds per call on hot paths; a SymBool (a fake
# kernel under torch.compile) or a failure goes through it.
def _type(cond, msg):
    if cond is not True:
        torch._check_type(cond, lambda: f"worm: {msg()}")


def _value(cond, msg):
    if cond is not True:
        torch._check_value(cond, lambda: f"worm: {msg()}")


def _check_weights(ts, what, device):
    _value(len(ts) > 0, lambda: f"{what}: the list of tensors is empty")
    for i, t in enumerate(ts):
        _type(t.layout == torch.strided,
              lambda: f"{what}[{i}] has layout {t.layout}; the ops take dense tensors (.to_dense())")
        _type(t.dtype in FLOAT_DTYPES,
              lambda: f"{what}[{i}] has dtype {t.dtype}; the ops take float32, bfloat16 and "
                      "float16 (convert it, e.g. .float())")
        _value(t.device == device,
               lambda: f"{what}[{i}] is on {t.device} but {what}[0] is on {device}; "
                       "move them to one device")
        _value(t.numel() > 0, lambda: f"{what}[{i}] has no entries")


def _check_contiguous(t, what):
    _value(t.is_contiguous(),
           lambda: f"{what} is not contiguous (strides {tuple(t.stride())}); the op writes it "
                   "in place as flat memory: pass a contiguous tensor")


def _check_bits(bits, n, device, what):
    _type(bits.dtype == torch.uint8,
          lambda: f"{what} has dtype {bits.dtype}; a packed mask is uint8 (docs/ops.md)")
    _value(bits.dim() == 1 and bits.numel() == (n + 7) // 8,
           lambda: f"{what} has shape {tuple(bits.shape)}; a tensor of {n} entries needs a "
                   f"1-D packed mask of ceil({n}/8) = {(n + 7) // 8} bytes")
    _value(bits.device == device, lambda: f"{what} is on {bits.device}, its tensor on {device}")


def check_select_thresholds(tensors, ks, scope):
    _check_weights(tensors, "select_thresholds tensors", tensors[0].device if tensors else None)
    _value(scope in ("global", "layer"),
           lambda: f"scope must be 'global' or 'layer', got {scope!r}")
    if scope == "global":
        _value(len(ks) == 1, lambda: f"scope='global' takes one k, got {len(ks)}")
        n = sum(t.numel() for t in tensors)
        _value(ks[0] >= 0, lambda: f"k={ks[0]} is negative")
        _value(ks[0] <= n, lambda: f"k={ks[0]} outside [0, {n}] for the whole set")
    else:
        _value(len(ks) == len(tensors),
               lambda: f"scope='layer' takes one k per tensor: {len(ks)} ks, {len(tensors)} tensors")
        for i, (k, t) in enumerate(zip(ks, tensors)):
            _value(k >= 0, lambda: f"ks[{i}]={k} is negative")
            _value(k <= t.numel(), lambda: f"ks[{i}]={k} outside [0, {t.numel()}] for tensor {i}")


def check_mask_update(tensors, thr, window, head):
    dev = tensors[0].device if tensors else None
    _check_weights(tensors, "mask_update_ tensors", dev)
    T = len(tensors)
    _type(thr.dtype == torch.float32, lambda: f"thr has dtype {thr.dtype}; thresholds are float32")
    _value(thr.dim() == 1 and thr.numel() == T,
           lambda: f"thr has shape {tuple(thr.shape)}; it holds one threshold per tensor: [{T}]")
    _value(thr.device == dev, lambda: f"thr is on {thr.device}, the tensors on {dev}")
    _check_window(tensors, window, head, dev)


def check_sample_mask(tensors, ks, scope, window, head):
    check_select_thresholds(tensors, ks, scope)
    _check_window(tensors, window, head, tensors[0].device)


def _check_window(tensors, window, head, dev):
    _type(window.dtype == torch.uint8,
          lambda: f"window has dtype {window.dtype}; the window is a uint8 [l, B] ring of packed masks")
    _value(window.dim() == 2,
           lambda: f"window has shape {tuple(window.shape)}; the window is uint8 [l, B]")
    need = sum((t.numel() + 7) // 8 for t in tensors)
    _value(window.shape[1] == need,
           lambda: f"window rows hold {window.shape[1]} bytes; these tensors pack into {need}")
    _value(window.shape[0] >= 1, lambda: "window has no rows")
    _value(window.shape[0] <= MAX_WINDOW,
           lambda: f"window has {window.shape[0]} rows; at most {MAX_WINDOW}")
    _value(window.device == dev, lambda: f"window is on {window.device}, the tensors on {dev}")
    _check_contiguous(window, "window")
    ok = 0 <= head < window.shape[0]
    if ok is not True:
        torch._check_index(ok,
                           lambda: f"worm: head={head} outside the window's {window.shape[0]} rows")


def check_truncate(grads, keep_bits, r):
    dev = grads[0].device if grads else None
    _check_weights(grads, "truncate_ grads", dev)
    _value(len(keep_bits) == len(grads),
           lambda: f"{len(grads)} grads but {len(keep_bits)} packed masks")
    for i, (g, b) in enumerate(zip(grads, keep_bits)):
        _check_contiguous(g, f"grads[{i}]")
        _check_bits(b, g.numel(), dev, f"keep_bits[{i}]")


def check_sgd_step(params, grads, bufs, fresh, keep_bits, momentum):
    dev = params[0].device if params else None
    _check_weights(params, "sgd_step_ params", dev)
    T = len(params)
    _value(len(grads) == T, lambda: f"{T} params but {len(grads)} grads")
    _value(len(keep_bits) == T, lambda: f"{T} params but {len(keep_bits)} keep_bits")
    if momentum != 0:
        _value(len(bufs) == T and len(fresh) == T,
               lambda: f"{T} params but {len(bufs)} momentum buffers and {len(fresh)} fresh flags")
    else:
        _value(len(bufs) == 0 and len(fresh) == 0,
               lambda: "momentum is 0: pass no momentum buffers and no fresh flags")
    for i, p in enumerate(params):
        _check_contiguous(p, f"params[{i}]")
        for what, x in (("grads", grads[i]), ("momentum_buffers", bufs[i] if bufs else None)):
            if x is None:
                continue
            _type(x.dtype == p.dtype,
                  lambda: f"{what}[{i}] has dtype {x.dtype}, its param {p.dtype}")
            _value(x.shape == p.shape and x.device == p.device,
                   lambda: f"{what}[{i}] is {tuple(x.shape)} on {x.device}; its param is "
                           f"{tuple(p.shape)} on {p.device}")
        if bufs:
            _check_contiguous(bufs[i], f"momentum_buffers[{i}]")
        if keep_bits[i] is not None:
            _check_bits(keep_bits[i], p.numel(), dev, f"keep_bits[{i}]")


# ------------------------------------------------------------------ the kernels
def _contig(ts):
    return [t if t.is_contiguous() else t.contiguous() for t in ts]


def _select_kernel(tensors, ks, scope):
    check_select_thresholds(tensors, ks, scope)
    impl = _backends.choose(tensors[0].device)
    return impl.select_thresholds(_contig(tensors), list(ks), scope)


def _mask_update_kernel(tensors, thr, window, head):
    check_mask_update(tensors, thr, window, head)
    impl = _backends.choose(window.device)
    return impl.mask_update_(_contig(tensors), thr.contiguous(), window, head)


def _sample_kernel(tensors, ks, scope, window, head):
    check_sample_mask(tensors, ks, scope, window, head)
    impl = _backends.choose(window.device)
    return impl.sample_mask_(_contig(tensors), list(ks), scope, window, head)


def _truncate_kernel(grads, keep_bits, r):
    check_truncate(grads, keep_bits, r)
    _backends.choose(grads[0].device).truncate_(grads, _contig(keep_bits), r)


def _sgd_kernel(params, grads, momentum_buffers, fresh, keep_bits, *, r, lr, weight_decay,
                momentum, dampening, nesterov, maximize):
    check_sgd_step(params, grads, momentum_buffers, fresh, keep_bits, momentum)
    bits = [None if b is None else b.contiguous() for b in keep_bits]
    _backends.choose(params[0].device).sgd_step_(
        params, _contig(grads), momentum_buffers, list(fresh), bits, r=r, lr=lr,
        weight_decay=weight_decay, momentum=momentum, dampening=dampening, nesterov=nesterov,
        maximize=maximize)


def _select_fake(tensors, ks, scope):
    check_select_thresholds(tensors, ks, scope)
    n = len(tensors)
    return (tensors[0].new_empty((n,), dtype=torch.float32),
            tensors[0].new_empty((n,), dtype=torch.int64))


def _mask_update_fake(tensors, thr, window, head):
    check_mask_update(tensors, thr, window, head)
    return window.new_empty((window.shape[0],), dtype=torch.int64)


def _sample_fake(tensors, ks, scope, window, head):
    check_sample_mask(tensors, ks, scope, window, head)
    n = len(tensors)
    return (tensors[0].new_empty((n,), dtype=torch.float32),
            tensors[0].new_empty((n,), dtype=torch.int64),
            window.new_empty((window.shape[0],), dtype=torch.int64))


def _truncate_fake(grads, keep_bits, r):
    check_truncate(grads, keep_bits, r)


def _sgd_fake(params, grads, momentum_buffers, fresh, keep_bits, *, r, lr, weight_decay,
              momentum, dampening, nesterov, maximize):
    check_sgd_step(params, grads, momentum_buffers, fresh, keep_bits, momentum)


_lib = torch.library.Library("worm", "DEF")
for _name, _kernel, _fake in (("select_thresholds", _select_kernel, _select_fake),
                              ("mask_update_", _mask_update_kernel, _mask_update_fake),
                              ("sample_mask_", _sample_kernel, _sample_fake),
                              ("truncate_", _truncate_kernel, _truncate_fake),
                              ("sgd_step_", _sgd_kernel, _sgd_fake)):
    _lib.define(SCHEMAS[_name])
    for _key in ("CPU", "CUDA"):
        _lib.impl(_name, _kernel, _key)
    torch.library.register_fake(f"worm::{_name}", _fake, lib=_lib)


# ------------------------------------------------------------------ the wrappers
def _tensor_list(xs, what, optional=False) -> list:
    xs = list(xs)
    for i, x in enumerate(xs):
        if not isinstance(x, torch.Tensor) and not (optional and x is None):
            raise TypeError(f"worm: {what}[{i}] is a {type(x).__name__}, not a tensor")
    return xs


def _nonempty(xs, what):
    if not xs:
        raise ValueError(f"worm: {what}: the list of tensors is empty")
    return xs


def select_thresholds(tensors: Sequence[torch.Tensor], ks: Sequence[int],
                      scope: str = "global") -> Tuple[torch.Tensor, torch.Tensor]:
    """The k-th smallest ``|w|`` (1-indexed, fp32) over a set of tensors.

    ``scope="global"``: ``ks == [k]`` for the whole set, the threshold repeated once
    per tensor; ``"layer"``: one k per tensor. Returns ``(thr, nonfinite)``: ``thr``
    fp32 [T] (``-inf`` where k == 0; NaN everywhere if the set holds any NaN/Inf) and
    ``nonfinite`` int64 [T], the NaN/Inf entries of each tensor, which the caller
    checks (it is the op's only way to report them without a host sync).
    The passes behind it can be driven one at a time: :mod:`worm.radix`.
    """
    tensors = _nonempty(_tensor_list(tensors, "select_thresholds tensors"), "select_thresholds")
    return torch.ops.worm.select_thresholds([t.detach() for t in tensors], _ks(ks), scope)


def _ks(ks) -> List[int]:
    """ks as a list of ints; a ratio or a float is the usual slip, so say how to get k."""
    if isinstance(ks, (int, float, torch.Tensor)) or not isinstance(ks, Sequence):
        raise TypeError(f"ks must be a list of entry counts ([k] for scope='global', one per "
                        f"tensor for 'layer'), got {type(ks).__name__} {ks!r}; from a prune ratio "
                        "p: k = worm.reference.num_pruned(n, p)")
    out = []
    for k in ks:
        if isinstance(k, bool) or not (isinstance(k, int) or (isinstance(k, float) and k.is_integer())
                                       or (isinstance(k, torch.Tensor) and k.numel() == 1
                                           and not k.is_floating_point())):
            raise TypeError(f"ks must hold whole numbers of entries, got {k!r}; from a prune "
                            "ratio p: k = worm.reference.num_pruned(n, p)")
        out.append(int(k))
    return out


def mask_update_(tensors: Sequence[torch.Tensor], thr: torch.Tensor, window: torch.Tensor,
                 head: int) -> torch.Tensor:
    """Writes the packed mask ``|w| > thr[i]`` into ``window[head]``; int64 [l] counts.

    ``window`` is uint8 [l, B], a ring of packed masks (layout: docs/ops.md); the
    result holds, for every row j, popcount(new mask XOR row j's content before the
    write). Row ``head``'s own count is against the mask it overwrote.
    """
    tensors = _nonempty(_tensor_list(tensors, "mask_update_ tensors"), "mask_update_")
    return torch.ops.worm.mask_update_([t.detach() for t in tensors], thr, window, int(head))


def sample_mask_(tensors: Sequence[torch.Tensor], ks: Sequence[int], scope: str,
                 window: torch.Tensor, head: int
                 ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One sampling step: :func:`select_thresholds`, then :func:`mask_update_` with
    its thresholds into ``window[head]``. Returns ``(thr, nonfinite, counts)``.

    The same results as the two calls, with one difference that keeps state whole:
    where the set holds NaN/Inf (``nonfinite`` not all 0; ``thr`` NaN) the window is
    left exactly as it was and ``counts`` is all 0. The C++ kernel fuses the two
    (about 1.1-1.3 reads' worth of memory traffic instead of 3-4: docs/ops.md,
    "Sampling in one pass"); other backends run the two ops.
    """
    tensors = _nonempty(_tensor_list(tensors, "sample_mask_ tensors"), "sample_mask_")
    return torch.ops.worm.sample_mask_([t.detach() for t in tensors], _ks(ks), scope, window,
                                       int(head))


def truncate_(grads: Sequence[torch.Tensor], keep_bits: Sequence[torch.Tensor], r: float) -> None:
    """In place, for every i: ``grads[i] *= keep ? 1 : r`` (keep from ``keep_bits[i]``).

    The product is formed in fp32 and rounded once to the gradient's dtype: for fp32
    gradients exactly what a hook computing ``g * where(keep, 1, r)`` does.
    An empty list is a no-op.
    """
    grads = _tensor_list(grads, "truncate_ grads")
    if grads:
        torch.ops.worm.truncate_(grads, _tensor_list(keep_bits, "keep_bits"), float(r))


def sgd_step_(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
              momentum_buffers: Sequence[Optional[torch.Tensor]],
              keep_bits: Sequence[Optional[torch.Tensor]], *, r: float, lr: float,
              weight_decay: float, momentum: float, dampening: float, nesterov: bool,
              maximize: bool) -> List[Optional[torch.Tensor]]:
    """One fused WormSGD step: truncation by ``r``, then torch.optim.SGD's update.

    ``momentum_buffers[i]`` None means "first step" (the buffer becomes the truncated,
    decayed gradient, as in torch.optim.SGD); ``keep_bits[i]`` None: no truncation
    for that param. Returns the buffers (new tensors where None came in; all None
    when momentum == 0). Grads are left unmodified. An empty list is a no-op.
    """
    params = [p.detach() for p in _tensor_list(params, "sgd_step_ params")]
    if not params:
        return []
    grads = _tensor_list(grads, "sgd_step_ grads")
    bufs = _tensor_list(momentum_buffers, "momentum_buffers", optional=True)
    bits = _tensor_list(keep_bits, "keep_bits", optional=True)
    if len(bufs) != len(params):
        raise ValueError(f"worm: {len(params)} params but {len(bufs)} momentum buffers "
                         "(pass None for a buffer not created yet)")
    kw = dict(r=float(r), lr=float(lr), weight_decay=float(weight_decay),
              momentum=float(momentum), dampening=float(dampening), nesterov=bool(nesterov),
              maximize=bool(maximize))
    if momentum != 0:
        fresh = [1 if b is None else 0 for b in bufs]
        bufs = [torch.empty_like(p, memory_format=torch.contiguous_format) if b is None else b
                for p, b in zip(params, bufs)]
        torch.ops.worm.sgd_step_(params, grads, bufs, fresh, bits, **kw)
        return bufs
    torch.ops.worm.sgd_step_(params, grads, [], [], bits, **kw)
    return [None] * len(params)


def backend(device=None) -> str:
    """Name of the implementation that runs the ops on ``device`` now."""
    return _backends.choose(_default_device(device)).name


def backend_info(device=None) -> dict:
    """Every implementation with ``"ok"`` or the reason it cannot run on ``device``."""
    return _backends.info(_default_device(device))


def _default_device(device):
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


__all__ = ["select_thresholds", "mask_update_", "sample_mask_", "truncate_", "sgd_step_", "backend",
           "backend_info", "SCHEMAS", "FLOAT_DTYPES", "MAX_WINDOW"]
