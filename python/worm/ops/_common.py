"""What the five op modules share: the library, the dtypes, and the check helpers.

The checks are written with ``torch._check_*`` so the same code runs in the real
kernels (plain bools) and in the fake kernels (symbolic sizes under torch.compile).
A plain True (every passing check in a real kernel) skips ``torch._check``, whose
symbolic-shape machinery costs microseconds per call on hot paths; a SymBool (a fake
kernel under torch.compile) or a failure goes through it.
"""
from __future__ import annotations

from typing import List, Sequence

import torch

from .. import _backends

# The dtypes every op takes for weights, gradients, params and buffers.
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SCOPES = ("global", "layer")

lib = torch.library.Library("worm", "DEF")
SCHEMAS: dict = {}   # op name -> schema (without namespace); csrc builds worm_native from these


def register(name, schema, kernel, fake):
    """Defines ``torch.ops.worm.<name>`` with one kernel for CPU and CUDA and a fake."""
    SCHEMAS[name] = schema
    lib.define(schema)
    for key in ("CPU", "CUDA"):
        lib.impl(name, kernel, key)
    torch.library.register_fake(f"worm::{name}", fake, lib=lib)


# ------------------------------------------------------------------ the checks
def type_(cond, msg):
    if cond is not True:
        torch._check_type(cond, lambda: f"worm: {msg()}")


def value(cond, msg):
    if cond is not True:
        torch._check_value(cond, lambda: f"worm: {msg()}")


def check_scope(scope):
    value(scope in SCOPES, lambda: f"scope must be 'global' or 'layer', got {scope!r}")


def check_weights(ts, what, device):
    value(len(ts) > 0, lambda: f"{what}: the list of tensors is empty")
    for i, t in enumerate(ts):
        type_(t.layout == torch.strided,
              lambda: f"{what}[{i}] has layout {t.layout}; the ops take dense tensors (.to_dense())")
        type_(t.dtype in FLOAT_DTYPES,
              lambda: f"{what}[{i}] has dtype {t.dtype}; the ops take float32, bfloat16 and "
                      "float16 (convert it, e.g. .float())")
        value(t.device == device,
              lambda: f"{what}[{i}] is on {t.device} but {what}[0] is on {device}; "
                      "move them to one device")
        value(t.numel() > 0, lambda: f"{what}[{i}] has no entries")


def check_contiguous(t, what):
    value(t.is_contiguous(),
          lambda: f"{what} is not contiguous (strides {tuple(t.stride())}); the op writes it "
                  "in place as flat memory: pass a contiguous tensor")


def check_bits(bits, n, device, what):
    type_(bits.dtype == torch.uint8,
          lambda: f"{what} has dtype {bits.dtype}; a packed mask is uint8 (docs/ops.md)")
    value(bits.dim() == 1 and bits.numel() == (n + 7) // 8,
          lambda: f"{what} has shape {tuple(bits.shape)}; a tensor of {n} entries needs a "
                  f"1-D packed mask of ceil({n}/8) = {(n + 7) // 8} bytes")
    value(bits.device == device, lambda: f"{what} is on {bits.device}, its tensor on {device}")


def check_ks(tensors, ks, scope):
    check_scope(scope)
    if scope == "global":
        value(len(ks) == 1, lambda: f"scope='global' takes one k, got {len(ks)}")
        n = sum(t.numel() for t in tensors)
        value(ks[0] >= 0, lambda: f"k={ks[0]} is negative")
        value(ks[0] <= n, lambda: f"k={ks[0]} outside [0, {n}] for the whole set")
    else:
        value(len(ks) == len(tensors),
              lambda: f"scope='layer' takes one k per tensor: {len(ks)} ks, {len(tensors)} tensors")
        for i, (k, t) in enumerate(zip(ks, tensors)):
            value(k >= 0, lambda: f"ks[{i}]={k} is negative")
            value(k <= t.numel(), lambda: f"ks[{i}]={k} outside [0, {t.numel()}] for tensor {i}")


def check_window(tensors, window, head, dev):
    type_(window.dtype == torch.uint8,
          lambda: f"window has dtype {window.dtype}; the window is a uint8 [l, B] ring of packed masks")
    value(window.dim() == 2,
          lambda: f"window has shape {tuple(window.shape)}; the window is uint8 [l, B]")
    need = sum((t.numel() + 7) // 8 for t in tensors)
    value(window.shape[1] == need,
          lambda: f"window rows hold {window.shape[1]} bytes; these tensors pack into {need}")
    value(window.shape[0] >= 1, lambda: "window has no rows")
    value(window.device == dev, lambda: f"window is on {window.device}, the tensors on {dev}")
    check_contiguous(window, "window")
    ok = 0 <= head < window.shape[0]
    if ok is not True:
        torch._check_index(ok,
                           lambda: f"worm: head={head} outside the window's {window.shape[0]} rows")


def check_rows(impl, window):
    """The chosen implementation's own limit on window rows per call (most have none)."""
    limit = impl.max_window
    if limit is not None and window.shape[0] > limit:
        raise ValueError(f"worm: window has {window.shape[0]} rows; the {impl.name} backend "
                         f"takes at most {limit} per call (worm.ops.max_window; MaskWindow "
                         "splits longer windows itself)")


def choose(device):
    return _backends.choose(device)


# ------------------------------------------------------------ wrapper helpers
def contig(ts):
    return [t if t.is_contiguous() else t.contiguous() for t in ts]


def tensor_list(xs, what, optional=False) -> list:
    xs = list(xs)
    for i, x in enumerate(xs):
        if not isinstance(x, torch.Tensor) and not (optional and x is None):
            raise TypeError(f"worm: {what}[{i}] is a {type(x).__name__}, not a tensor")
    return xs


def nonempty(xs, what):
    if not xs:
        raise ValueError(f"worm: {what}: the list of tensors is empty")
    return xs


def as_ks(ks) -> List[int]:
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
