"""Structured pruning: rebuild a CNN with fewer channels from an Early-Bird ticket.

A ticket is ``{bn.weight: keep}`` with ``keep`` a bool vector over that BatchNorm's
channels (``EarlyBird.ticket`` with ``layers="bn"``). The rebuilt model really has
fewer channels, so it runs fewer FLOPs; with the same weights it computes exactly
what the original computes with the pruned channels' gamma and beta set to zero
(such a channel is 0 after BN and ReLU, so the next layer never sees it).

Rules
-----
* The original model is not modified: the new one is a deep copy in which the
  pruned layers are replaced by smaller ones, on the same device and dtype, with
  the kept weights, BN statistics and ``num_batches_tracked`` copied, and the same
  train/eval mode and ``requires_grad`` flags.
* A layer never drops to zero channels: if a mask keeps none, the channel with the
  largest ``|gamma|`` is kept (the public Early-Bird code drops such a layer, which
  breaks the network).
* A BN without a mask in the ticket keeps all its channels. A mask on a BN's bias
  may be given too; it must equal the weight's mask (it is used if only the bias
  has one).
* ResNet (CIFAR BasicBlocks): only the inner channels of each block are pruned
  (conv1/bn1 outputs, conv2 inputs). Block outputs (the stem BN, every bn2 and
  shortcut BN) stay at full width so the residual sums line up; masks on those
  BNs are ignored.
* Plain stacks (VGG-11-BN, the tiny "cnn"): each conv/BN loses its pruned output
  channels, the next conv the matching inputs, and after the last conv the
  linear head the matching input features.
* Other architectures raise a TypeError naming the class.
"""
from __future__ import annotations

import copy
from typing import Dict, Mapping, Optional, Sequence

import torch
from torch import nn

from .models import BasicBlock, PlainCNN, ResNet

__all__ = ["prune_channels", "count_params", "count_flops", "pruning_report", "format_report"]

_BN = (nn.BatchNorm2d,)


# ------------------------------------------------------------------ ticket checks
def _bn_masks(model: nn.Module, ticket: Mapping) -> Dict[nn.Module, torch.Tensor]:
    """The ticket as ``{bn module: keep (bool, cpu)}``, validated against the model."""
    owner = {}
    for name, mod in model.named_modules():
        if isinstance(mod, _BN) and mod.weight is not None:
            owner[id(mod.weight)] = (mod, name, "weight")
            if mod.bias is not None:
                owner[id(mod.bias)] = (mod, name, "bias")
    by_bn: Dict[nn.Module, dict] = {}
    for key, keep in ticket.items():
        if id(key) not in owner:
            shape = tuple(key.shape) if isinstance(key, torch.Tensor) else type(key).__name__
            raise ValueError(f"ticket key (shape {shape}) is not the weight or bias of a "
                             f"BatchNorm2d in this {type(model).__name__}; pass the ticket "
                             "taken from this very model (search.ticket)")
        mod, name, kind = owner[id(key)]
        if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool:
            raise TypeError(f"ticket mask for {name}.{kind} must be a bool tensor, got "
                            f"{getattr(keep, 'dtype', type(keep).__name__)}")
        if keep.shape != (mod.num_features,):
            raise ValueError(f"ticket mask for {name}.{kind} has shape {tuple(keep.shape)}; "
                             f"expected ({mod.num_features},)")
        by_bn.setdefault(mod, {"name": name})[kind] = keep.detach().cpu()
    out = {}
    for mod, d in by_bn.items():
        w, b = d.get("weight"), d.get("bias")
        if w is not None and b is not None and not torch.equal(w, b):
            raise ValueError(f"ticket masks for {d['name']}.weight and {d['name']}.bias differ; "
                             "a channel is kept or pruned as a whole")
        out[mod] = w if w is not None else b
    return out


def _kept_index(bn: nn.Module, keep: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Indexes of kept channels (cpu int64), or None when all are kept."""
    if keep is None or bool(keep.all()):
        return None
    if not bool(keep.any()):
        # Keep the strongest channel rather than cut the network in two.
        return bn.weight.detach().abs().float().argmax().reshape(1).cpu()
    return keep.nonzero().flatten()


# ------------------------------------------------------------- smaller layers
def _like(new: nn.Module, old: nn.Module) -> nn.Module:
    new.train(old.training)
    for (_, pn), (_, po) in zip(new.named_parameters(), old.named_parameters()):
        pn.requires_grad_(po.requires_grad)
    return new


def _take(t: torch.Tensor, dim: int, idx: Optional[torch.Tensor]) -> torch.Tensor:
    return t if idx is None else t.index_select(dim, idx.to(t.device))


def _sub_conv(conv: nn.Conv2d, out_idx=None, in_idx=None) -> nn.Conv2d:
    if conv.groups != 1:
        raise TypeError(f"cannot prune grouped convolution (groups={conv.groups})")
    w = _take(_take(conv.weight.detach(), 0, out_idx), 1, in_idx)
    new = nn.Conv2d(w.shape[1], w.shape[0], conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, 1, conv.bias is not None, conv.padding_mode,
                    device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.weight.copy_(w)
        if conv.bias is not None:
            new.bias.copy_(_take(conv.bias.detach(), 0, out_idx))
    return _like(new, conv)


def _sub_bn(bn: nn.BatchNorm2d, idx) -> nn.BatchNorm2d:
    ref = bn.weight if bn.weight is not None else bn.running_mean
    n = bn.num_features if idx is None else len(idx)
    new = type(bn)(n, bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
                   device=ref.device, dtype=ref.dtype)
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var"):
            src = getattr(bn, name)
            if src is not None:
                getattr(new, name).copy_(_take(src.detach(), 0, idx))
        if bn.num_batches_tracked is not None:
            new.num_batches_tracked.copy_(bn.num_batches_tracked)
    return _like(new, bn)


def _sub_linear(lin: nn.Linear, in_idx) -> nn.Linear:
    w = _take(lin.weight.detach(), 1, in_idx)
    new = nn.Linear(w.shape[1], w.shape[0], lin.bias is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.weight.copy_(w)
        if lin.bias is not None:
            new.bias.copy_(lin.bias.detach())
    return _like(new, lin)


# ------------------------------------------------------------- architectures
def _prune_resnet(model: ResNet, masks) -> ResNet:
    new = copy.deepcopy(model)
    for old_b, b in zip(model.blocks(), new.blocks()):
        if not isinstance(old_b, BasicBlock):
            raise TypeError(f"cannot prune ResNet block {type(old_b).__name__}; "
                            "only BasicBlock is supported")
        idx = _kept_index(old_b.bn1, masks.get(old_b.bn1))
        if idx is None:
            continue
        b.conv1 = _sub_conv(old_b.conv1, out_idx=idx)
        b.bn1 = _sub_bn(old_b.bn1, idx)
        b.conv2 = _sub_conv(old_b.conv2, in_idx=idx)
    return new


def _prune_plain(model: PlainCNN, masks) -> PlainCNN:
    new = copy.deepcopy(model)
    feats = list(model.features)
    prev = None   # kept input channels of the next conv (None: all)
    cfg = []
    for i, m in enumerate(feats):
        if isinstance(m, nn.Conv2d):
            bn = feats[i + 1] if i + 1 < len(feats) else None
            if not isinstance(bn, _BN):
                raise TypeError(f"PlainCNN.features[{i}] is a conv not followed by BatchNorm2d; "
                                "cannot tell which channels to prune")
            idx = _kept_index(bn, masks.get(bn))
            new.features[i] = _sub_conv(m, out_idx=idx, in_idx=prev)
            new.features[i + 1] = _sub_bn(bn, idx)
            prev = idx
            cfg.append(bn.num_features if idx is None else len(idx))
        elif isinstance(m, nn.MaxPool2d):
            cfg.append("M")
        elif not isinstance(m, (_BN, nn.ReLU, nn.Identity, nn.Dropout)):
            raise TypeError(f"PlainCNN.features[{i}] is a {type(m).__name__}; cannot tell how "
                            "it maps channels")
    new.classifier = _sub_linear(model.classifier, prev)
    new.cfg = tuple(cfg)
    return new


def prune_channels(model: nn.Module, ticket: Mapping) -> nn.Module:
    """A new, smaller model with the channels the ticket prunes physically removed.

    ``ticket``: ``{bn.weight: keep (bool, shape (C,))}``. See the module docstring for
    the rules (never zero channels; ResNet prunes block-inner channels only).
    """
    if isinstance(model, ResNet):
        pruner = _prune_resnet
    elif isinstance(model, PlainCNN):
        pruner = _prune_plain
    else:
        raise TypeError(f"prune_channels does not know how to rebuild {type(model).__name__}; "
                        "supported: worm.models.ResNet (resnet18) and worm.models.PlainCNN "
                        "(vgg11_bn, cnn)")
    if not isinstance(ticket, Mapping):
        raise TypeError(f"ticket must be a dict {{bn.weight: keep_mask}}, got {type(ticket).__name__}")
    return pruner(model, _bn_masks(model, ticket))


# ------------------------------------------------------------- measuring
def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _default_input(model: nn.Module):
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return (1, m.in_channels, 32, 32)
    raise ValueError(f"{type(model).__name__} has no Conv2d; pass input_size")


def count_flops(model: nn.Module, input_size: Optional[Sequence[int]] = None) -> int:
    """Multiply-accumulates of all Conv2d and Linear layers for one forward pass of a
    zero input of ``input_size`` (default ``(1, C, 32, 32)``). Run in eval mode under
    no_grad, so BN statistics are untouched; each module's mode is restored."""
    input_size = tuple(input_size) if input_size is not None else _default_input(model)
    total = [0]

    def conv_hook(m, inp, out):
        kh, kw = m.kernel_size
        total[0] += out.numel() * (m.in_channels // m.groups) * kh * kw

    def linear_hook(m, inp, out):
        total[0] += out.numel() * m.in_features

    handles, modes = [], [(m, m.training) for m in model.modules()]
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
    p = next(model.parameters(), None)
    x = torch.zeros(input_size, device=p.device if p is not None else "cpu",
                    dtype=p.dtype if p is not None else torch.float32)
    try:
        model.eval()
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
        for m, t in modes:
            m.training = t
    return total[0]


def pruning_report(before: nn.Module, after: nn.Module,
                   input_size: Optional[Sequence[int]] = None) -> dict:
    """Parameters, MACs and per-BN channel counts before and after pruning.

    Keys: params_before, params_after, flops_before, flops_after (MACs),
    params_kept, flops_kept (fractions), channels ({bn name: [before, after]} for BNs
    present in both), text (a printable summary).
    """
    input_size = tuple(input_size) if input_size is not None else _default_input(before)
    bns_after = {n: m for n, m in after.named_modules() if isinstance(m, _BN)}
    channels = {n: [m.num_features, bns_after[n].num_features]
                for n, m in before.named_modules() if isinstance(m, _BN) and n in bns_after}
    rep = {
        "params_before": count_params(before),
        "params_after": count_params(after),
        "flops_before": count_flops(before, input_size),
        "flops_after": count_flops(after, input_size),
        "channels": channels,
    }
    rep["params_kept"] = rep["params_after"] / max(rep["params_before"], 1)
    rep["flops_kept"] = rep["flops_after"] / max(rep["flops_before"], 1)
    rep["text"] = format_report(rep)
    return rep


def format_report(rep: Mapping) -> str:
    ch = rep.get("channels", {})
    pruned = sum(b - a for b, a in ch.values())
    total = sum(b for b, _ in ch.values())
    return (f"params {rep['params_before']:,} -> {rep['params_after']:,} "
            f"({100 * rep['params_kept']:.1f}% kept); "
            f"MACs {rep['flops_before']:,} -> {rep['flops_after']:,} "
            f"({100 * rep['flops_kept']:.1f}% kept); "
            f"BN channels pruned {pruned:,} of {total:,}")
