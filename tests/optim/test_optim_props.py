"""Property tests: WormSGD (and GradTruncation) against torch's own optimizer plus
gradient hooks, over random parameter sets (shapes, layouts, dtypes), hyper-parameters,
param groups, foreach/fused requests, GradScaler and several truncation owners.

A "model" here is a list of parameters and the loss ``sum(p * G_t)``: backward gives
each parameter exactly ``G_t`` (scaled by the GradScaler when one runs), through real
autograd, so gradient hooks fire as in any model.

Equality: bit for bit wherever WormSGD runs torch's own path (the reference backend,
explicit foreach/fused, and every parameter the kernels do not take). On the kernel
path the documented bound: fp32 within 1 ulp per step (FMA contraction), bf16/fp16
within 1 ulp of the parameter dtype per step (worm_kernels/sgd_step.py, optim.py).
"""
import os

import pytest
import torch

from testkit import backward_and_step, truncating_hook
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import worm
from worm.optim import GradTruncation

STEPS = 3
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.complex64]
LAYOUTS = ["contiguous", "transposed", "channels_last", "strided"]
SETTINGS = dict(max_examples=int(os.environ.get("WORM_PROP_EXAMPLES", "80")), deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _make(spec, seed):
    """Parameters per spec [(dtype, layout, shape)], same values for the same seed."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for dtype, layout, shape in spec:
        real = torch.float32 if dtype.is_complex else dtype
        if layout == "transposed":
            t = torch.randn(shape[::-1], generator=g).to(real).t()
        elif layout == "channels_last":
            t = torch.randn(shape, generator=g).to(real).to(memory_format=torch.channels_last)
        elif layout == "strided":  # a non-dense view: every other entry of a bigger tensor
            t = torch.randn((2 * shape[0],) + tuple(shape[1:]), generator=g).to(real)[::2]
        else:
            t = torch.randn(shape, generator=g).to(real)
        if dtype.is_complex:
            t = torch.complex(t, torch.randn(t.shape, generator=g).to(real))
        out.append(nn.Parameter(t))
    return out


def _grads(params, steps, seed):
    g = torch.Generator().manual_seed(seed + 1000)
    return [[torch.randn(p.shape, generator=g, dtype=torch.float32).to(
        p.dtype if not p.dtype.is_complex else torch.float32) for p in params] for _ in range(steps)]





def _groups(params, split, lrs):
    if split == 0 or split >= len(params):
        return [{"params": params}]
    return [{"params": params[:split]}, {"params": params[split:], "lr": lrs[1], "weight_decay": 0.0}]


def _loss(params, G):
    total = 0
    for p, g in zip(params, G):
        total = total + (p * g).real.sum() if p.dtype.is_complex else total + (p * g).float().sum()
    return total


def _train(params, opt, grads, scaler):
    for G in grads:
        opt.zero_grad()
        backward_and_step(_loss(params, G), opt, scaler)


def _hooked_twins(spec, seed, owners, r_of):
    """Two equal parameter sets: ``a`` with truncating gradient hooks (the reference),
    ``b`` bare for the optimizer under test; the keep masks and each param's owner."""
    a, b = _make(spec, seed), _make(spec, seed)
    keeps = [torch.rand(p.shape, generator=torch.Generator().manual_seed(seed + i)) > 0.5
             for i, p in enumerate(a)]
    own = owners[:len(a)]
    for p, keep, o in zip(a, keeps, own):
        if o != "none":
            p.register_hook(truncating_hook(keep, r_of[o]))
    return a, b, keeps, own


def _scaler_takes(spec, fused):
    """GradScaler refuses complex grads, and fp16 grads unless the step unscales them."""
    return not any(d.is_complex or (d == torch.float16 and not fused) for d, _, _ in spec)


def _same(a, b, i):
    """Bit for bit, NaN == NaN (fp16 AdamW can overflow to NaN on both sides alike)."""
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"param {i}: {m}")


def _assert_match(ref_params, got_params, exact, steps):
    for i, (a, b) in enumerate(zip(ref_params, got_params)):
        if exact:
            _same(a, b, i)
        else:
            # the kernels' documented bound: <= 1 ulp per step at the scale of the tensor
            # (an entry that cancels to ~0 keeps the rounding error of its larger terms)
            diff = (a.detach() - b.detach()).abs().float()
            scale = max(a.detach().abs().max().item(), 1.0)
            bound = 2 * steps * torch.finfo(a.dtype).eps * scale
            assert diff.max().item() <= bound, f"param {i} ({a.dtype}): diff {diff.max().item()} > {bound}"


spec_st = st.lists(
    st.tuples(st.sampled_from(DTYPES), st.sampled_from(LAYOUTS),
              st.sampled_from([(7,), (5, 3), (2, 3, 2, 2), (4, 4)])),
    min_size=1, max_size=4).map(
        # channels_last needs 4-D; transposed 2-D; keep the spec valid instead of rejecting
        lambda xs: [(d, ("channels_last" if lay == "channels_last" and len(s) == 4 else
                         "transposed" if lay == "transposed" and len(s) == 2 else
                         "strided" if lay == "strided" else "contiguous"), s) for d, lay, s in xs])

hyper_st = st.fixed_dictionaries({
    "lr": st.sampled_from([0.1, 0.01]),
    "momentum": st.sampled_from([0.0, 0.9]),
    "dampening": st.sampled_from([0.0, 0.1]),
    "nesterov": st.booleans(),
    "weight_decay": st.sampled_from([0.0, 1e-2]),
    "maximize": st.booleans(),
}).map(lambda h: {**h, "nesterov": h["nesterov"] and h["momentum"] != 0 and h["dampening"] == 0})


@settings(**SETTINGS)
@given(spec=spec_st, hyper=hyper_st, flags=st.sampled_from(["default", "foreach", "single", "fused"]),
       owners=st.lists(st.sampled_from(["none", "user", "search1", "search2"]), min_size=4, max_size=4),
       rs=st.tuples(st.sampled_from([0.0, 3e-3, 0.5, 1.0]), st.sampled_from([3e-3, 0.25])),
       split=st.integers(0, 3), amp=st.booleans(), seed=st.integers(0, 2 ** 16),
       backend=st.sampled_from(["default", "reference"]))
def test_wormsgd_equals_sgd_with_gradient_hooks(spec, hyper, flags, owners, rs, split, amp, seed, backend):
    if flags == "fused" and any(d.is_complex for d, _, _ in spec):
        flags = "foreach"  # torch's fused SGD takes no complex params (SGD refuses them too)
    amp = amp and _scaler_takes(spec, fused=flags == "fused")
    kw = {"default": {}, "foreach": {"foreach": True}, "single": {"foreach": False},
          "fused": {"fused": True}}[flags]
    r_of = {"user": rs[0], "search1": rs[1], "search2": 0.5}
    a, b, keeps, own = _hooked_twins(spec, seed, owners, r_of)
    ref_opt = torch.optim.SGD(_groups(a, split, (hyper["lr"], 0.05)), **hyper, **kw)
    opt = worm.WormSGD(_groups(b, split, (hyper["lr"], 0.05)), **hyper, **kw)
    handles = {o: GradTruncation(opt) for o in ("search1", "search2")}
    for o in ("user", "search1", "search2"):
        masks = {p: keep for p, keep, oo in zip(b, keeps, own) if oo == o}
        if masks:
            (opt.set_truncation if o == "user" else handles[o].set)(masks, r=r_of[o])
    grads = _grads(a, STEPS, seed)
    scaler = (lambda: torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)) if amp else (lambda: None)
    old = os.environ.get("WORM_BACKEND")
    if backend == "reference":
        os.environ["WORM_BACKEND"] = "reference"
    try:
        _train(a, ref_opt, grads, scaler())
        _train(b, opt, grads, scaler())
    finally:
        if old is None:
            os.environ.pop("WORM_BACKEND", None)
        else:
            os.environ["WORM_BACKEND"] = old
    # torch's path exactly: asked for by flags, the reference backend, or params the kernels refuse
    exact_all = flags != "default" or backend == "reference" or worm.backend("cpu") == "reference"
    for i, (pa, pb) in enumerate(zip(a, b)):
        kernel_takes = pb.dtype in (torch.float32, torch.bfloat16, torch.float16) and pb.is_contiguous()
        _assert_match([pa], [pb], exact_all or not kernel_takes, STEPS)
        if hyper["momentum"] != 0 and pa in ref_opt.state:
            ba, bb = ref_opt.state[pa]["momentum_buffer"], opt.state[pb]["momentum_buffer"]
            assert ba.dtype == bb.dtype and ba.shape == bb.shape
    # p.grad: a truncated param's is the raw (unscaled) gradient; any other's is SGD's
    for i, (pa, pb, G, o) in enumerate(zip(a, b, grads[-1], own)):
        if o != "none" and r_of[o] != 1.0:
            _same(pb.grad, G.to(pb.grad.dtype), i)
        else:
            _same(pb.grad, pa.grad, i)


@settings(**{**SETTINGS, "max_examples": max(1, SETTINGS["max_examples"] // 2)})
@given(spec=spec_st, owners=st.lists(st.sampled_from(["none", "h1", "h2"]), min_size=4, max_size=4),
       fused=st.booleans(), amp=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_adamw_pre_hook_equals_gradient_hooks(spec, owners, fused, amp, seed):
    if fused and any(d.is_complex for d, _, _ in spec):
        fused = False
    amp = amp and _scaler_takes(spec, fused)
    r_of = {"h1": 3e-3, "h2": 0.25}
    a, b, keeps, own = _hooked_twins(spec, seed, owners, r_of)
    kw = {"fused": True} if fused else {"foreach": False}
    ref_opt = torch.optim.AdamW(a, lr=1e-2, weight_decay=0.1, **kw)
    opt = torch.optim.AdamW(b, lr=1e-2, weight_decay=0.1, **kw)
    handles = {o: worm.truncation_pre_hook(opt) for o in ("h1", "h2")}
    for o, h in handles.items():
        masks = {p: keep for p, keep, oo in zip(b, keeps, own) if oo == o}
        if masks:
            h.set(masks, r=r_of[o])
    grads = _grads(a, STEPS, seed)
    scaler = (lambda: torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)) if amp else (lambda: None)
    _train(a, ref_opt, grads, scaler())
    _train(b, opt, grads, scaler())
    # the pre-hook's kernels round as the reference does (bit for bit for fp32)
    for i, (pa, pb) in enumerate(zip(a, b)):
        _same(pa, pb, i)


def _truncate_grads_of(params, keeps, own, r):
    """The step-side oracle: p.grad multiplied in place, as a step pre-hook would."""
    for p, keep, o in zip(params, keeps, own):
        if o != "none" and p.grad is not None:
            p.grad = truncating_hook(keep, r)(p.grad)


@settings(**{**SETTINGS, "max_examples": max(1, SETTINGS["max_examples"] // 4)})
@given(spec=spec_st, kind=st.sampled_from(["wormsgd", "sgd", "adamw"]),
       at=st.sampled_from(["step", "backward"]), clip=st.booleans(), accum=st.sampled_from([1, 2]),
       amp=st.booleans(), closure=st.booleans(),
       inf_steps=st.lists(st.booleans(), min_size=STEPS, max_size=STEPS),
       owners=st.lists(st.sampled_from(["none", "h"]), min_size=4, max_size=4),
       seed=st.integers(0, 2 ** 16))
def test_truncate_at_equals_its_torch_oracle_with_clipping_accumulation_amp_and_closures(
        spec, kind, at, clip, accum, amp, closure, inf_steps, owners, seed):
    """truncate_at="step": torch's optimizer plus a step pre-hook multiplying p.grad (with
    a closure: after each closure evaluation); "backward": plus gradient hooks. Bit for
    bit whatever runs between backward and step: clipping, micro-batch accumulation,
    GradScaler's unscaling and its skipped inf steps."""
    amp = amp and not closure and _scaler_takes(spec, fused=False)  # GradScaler takes no closure
    r = 0.25
    a, b = _make(spec, seed), _make(spec, seed)
    keeps = [torch.rand(p.shape, generator=torch.Generator().manual_seed(seed + i)) > 0.5
             for i, p in enumerate(a)]
    own = owners[:len(a)]

    def make(params):
        if kind == "wormsgd":
            return worm.WormSGD(params, lr=0.1, momentum=0.9, weight_decay=1e-2, foreach=False)
        if kind == "sgd":
            return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-2, foreach=False)
        return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, foreach=False)

    ref_opt, opt = make(a), make(b)
    if at == "backward":
        for p, keep, o in zip(a, keeps, own):
            if o != "none":
                p.register_hook(truncating_hook(keep, r))
    elif not closure:
        ref_opt.register_step_pre_hook(lambda o_, args, kw: _truncate_grads_of(a, keeps, own, r))
    masks = {p: k for p, k, o in zip(b, keeps, own) if o != "none"}
    GradTruncation(opt, at=at).set(masks, r=r) if masks else None
    grads = _grads(a, STEPS * accum, seed)

    def run(params, o, scaler, truncate_in_closure):
        for s in range(STEPS):
            micro = grads[s * accum:(s + 1) * accum]
            blow = float("inf") if amp and inf_steps[s] else 1.0

            def backward():
                o.zero_grad()
                for G in micro:
                    loss = _loss(params, G) * blow
                    (scaler.scale(loss) if scaler is not None else loss).backward()
                if scaler is not None and clip:
                    scaler.unscale_(o)
                if clip:
                    nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], 0.5)
                if truncate_in_closure:
                    _truncate_grads_of(params, keeps, own, r)
                return loss

            if closure:
                o.step(backward)
            else:
                backward()
                if scaler is not None:
                    scaler.step(o)
                    scaler.update()
                else:
                    o.step()

    new_scaler = (lambda: torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)) if amp else (lambda: None)
    run(a, ref_opt, new_scaler(), closure and at == "step")
    run(b, opt, new_scaler(), False)
    for i, (pa, pb) in enumerate(zip(a, b)):
        _same(pa, pb, i)
