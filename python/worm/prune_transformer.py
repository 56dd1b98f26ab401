"""Structured tickets made real: a transformer with the ticket's heads and FFN neurons
sliced out, of the same class, that runs fewer MACs.

``prune_structures(model, ticket)`` (reached through :func:`worm.prune_channels`)
reads, for every attention layer and FFN block of :mod:`worm.layouts`, which heads
(K/V groups under GQA) and neurons the ticket removes: a structure is removed when
its entries are False in the ticket's masks (the masks of a ``layers="heads"``/
``"ffn"`` search cover every entry a structure owns, and must agree on it). The copy
then holds smaller Q/K/V and output projections (and up/gate/down projections), and
its head attributes (``num_heads``/``num_attention_heads``/``n_heads``,
``all_head_size``, ``num_key_value_heads``, GPT-2's ``split_size``,
``intermediate_size``) match. Its outputs equal the dense model's with the removed
heads' output-projection columns and the removed neurons' down-projection columns
zeroed (softmax is per head, so a removed head changes no other head).

The config is updated when it can describe the result: the same count in every layer
and a config that reads ``head_dim``/``num_key_value_heads`` (Llama, Mistral, Qwen2,
ViT in transformers 5 for heads; every family for FFN sizes), checked by building the
class from the new config on the meta device and comparing every shape. Then
``save_pretrained``/``from_pretrained`` round-trip. Otherwise the config stays the
dense one, and :func:`load_pruned` rebuilds the model from it: dense config + ticket
+ state_dict, no pickled code.

A layer never loses every head or neuron: the structure with the largest score is
kept, with a warning (the realised model then departs from the ticket there).
"""
from __future__ import annotations

import copy
import warnings
from typing import Mapping, Optional, Sequence

import torch
from torch import nn

from .heads import StructRep, members_of
from .layouts import attention_layouts, ffn_layouts
from .timing import call as _call, dense_vs_pruned

__all__ = ["prune_structures", "load_pruned", "structured_plan", "transformer_report",
           "is_structured_ticket", "is_transformer"]


def _names(model: nn.Module, ticket: Mapping) -> dict:
    """The ticket as ``{parameter name: bool mask}``; keys may be names or the tensors."""
    by_id = {id(p): n for n, p in model.named_parameters()}
    params = dict(model.named_parameters())
    out = {}
    for key, keep in ticket.items():
        name = key if isinstance(key, str) else by_id.get(id(key))
        if name is None or name not in params:
            what = repr(key) if isinstance(key, str) else f"a tensor of shape {tuple(key.shape)}"
            raise ValueError(f"ticket entry {what} is not a parameter of this "
                             f"{type(model).__name__}; pass the ticket of this model's search")
        if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool:
            raise TypeError(f"ticket mask for {name} must be a bool tensor")
        if keep.shape != params[name].shape:
            raise ValueError(f"ticket mask for {name} has shape {tuple(keep.shape)}, the "
                             f"parameter {tuple(params[name].shape)}")
        out[name] = keep.detach().cpu()
    return out


def _layouts(model: nn.Module):
    """(attention layouts, FFN layouts, the errors met finding them)."""
    errors, found = [], []
    for fn in (attention_layouts, ffn_layouts):
        try:
            found.append(fn(model))
        except ValueError as e:
            found.append([])
            errors.append(str(e))
    return found[0], found[1], errors


def is_transformer(model: nn.Module) -> bool:
    """No BatchNorm and some attention module: prune_report's transformer path."""
    from .layers import BN_TYPES
    return not any(isinstance(m, BN_TYPES) for m in model.modules()) and \
        any(type(m).__name__.endswith("Attention") for m in model.modules())


def is_structured_ticket(model: nn.Module, ticket: Mapping) -> bool:
    """Whether every ticket entry belongs to a head or an FFN neuron of ``model``."""
    if not ticket:
        return False
    try:
        names = set(_names(model, ticket))
    except (ValueError, TypeError):
        return False
    att, ffn, _ = _layouts(model)
    owned = {e[1] for lay in [*att, *ffn] for e in lay.entries()}
    return bool(names) and names <= owned


def _structure_keep(lay, masks: dict) -> Optional[torch.Tensor]:
    """Per-structure keep of one layout from the ticket's masks (None: not in the ticket)."""
    keep = None
    for m in members_of(lay, 0):
        mask = masks.get(m.name)
        if mask is None:
            continue
        seg = mask.narrow(m.dim, m.start, m.count * m.size).movedim(m.dim, 0)
        seg = seg.reshape(m.count, -1)
        whole = seg.all(1)
        if not torch.equal(whole, seg.any(1)):
            raise ValueError(f"the ticket's mask of {m.name} keeps part of a head/neuron of "
                             f"{lay.name}: prune_channels removes whole structures; this ticket is "
                             "unstructured (layers='qk'?): keep it applied with worm.apply_masks")
        if keep is not None and not torch.equal(keep, whole):
            raise ValueError(f"the ticket's masks of {lay.name} disagree on which heads/neurons "
                             f"are kept ({m.name} differs); pass a layers='heads'/'ffn' ticket")
        keep = whole
    return keep


def structured_plan(model: nn.Module, ticket: Mapping) -> dict:
    """``{layout name: bool keep per structure}`` of every layout the ticket touches."""
    masks = _names(model, ticket)
    att, ffn, errors = _layouts(model)
    owned = {e[1] for lay in [*att, *ffn] for e in lay.entries()}
    stray = sorted(set(masks) - owned)
    if stray:
        why = f" ({'; '.join(errors)})" if errors else ""
        raise ValueError(f"ticket entry {stray[0]} is not part of an attention head or FFN neuron "
                         f"that worm can remove from {type(model).__name__}{why}")
    plan = {}
    for kind, lays in (("heads", att), ("ffn", ffn)):
        for lay in lays:
            keep = _structure_keep(lay, masks)
            if keep is not None:
                plan[(kind, lay.name)] = keep
    return plan


# ---------------------------------------------------------------- slicing
def _param(t: torch.Tensor, like: nn.Parameter) -> nn.Parameter:
    return nn.Parameter(t.detach().clone().contiguous(), requires_grad=like.requires_grad)


def _slice(mod: nn.Module, dim: int, idx: torch.Tensor, bias: bool) -> None:
    """Keep ``idx`` along ``dim`` of ``mod.weight`` (and of the bias when ``bias``)."""
    idx = idx.to(mod.weight.device)
    mod.weight = _param(mod.weight.index_select(dim, idx), mod.weight)
    if bias and getattr(mod, "bias", None) is not None:
        mod.bias = _param(mod.bias.index_select(0, idx), mod.bias)
    if isinstance(mod, nn.Linear):
        mod.out_features, mod.in_features = mod.weight.shape
    elif hasattr(mod, "nf"):  # transformers' Conv1D: weight [nx, nf]
        mod.nx, mod.nf = mod.weight.shape


def _rows(keep: torch.Tensor, size: int, offset: int = 0) -> torch.Tensor:
    base = keep.nonzero().flatten() * size
    return (base[:, None] + torch.arange(size)).flatten() + offset


def _prune_heads(lay, keep: torch.Tensor) -> int:
    d, g, kept = lay.head_dim, lay.group, int(keep.sum())
    if lay.packed:
        h = lay.n_heads * d
        cols = torch.cat([_rows(keep, d, s) for s in (0, h, 2 * h)])
        _slice(lay.proj["q"][1], 1, cols, bias=False)
        c_attn = lay.proj["q"][1]
        if c_attn.bias is not None:
            c_attn.bias = _param(c_attn.bias.index_select(0, cols), c_attn.bias)
        _slice(lay.proj["o"][1], 0, _rows(keep, d), bias=False)
    else:
        _slice(lay.proj["q"][1], 0, _rows(keep, g * d), bias=True)
        _slice(lay.proj["k"][1], 0, _rows(keep, d), bias=True)
        _slice(lay.proj["v"][1], 0, _rows(keep, d), bias=True)
        _slice(lay.proj["o"][1], 1, _rows(keep, g * d), bias=False)
    heads = kept * g
    mod = lay.module
    for a in ("num_heads", "num_attention_heads", "n_heads", "n_head"):
        if isinstance(getattr(mod, a, None), int):
            setattr(mod, a, heads)
    if isinstance(getattr(mod, "num_key_value_heads", None), int):
        mod.num_key_value_heads = kept
    if isinstance(getattr(mod, "all_head_size", None), int):
        mod.all_head_size = heads * d
    if lay.packed and isinstance(getattr(mod, "split_size", None), int):
        mod.split_size = heads * d
    return heads


def _prune_ffn(lay, keep: torch.Tensor) -> int:
    idx = keep.nonzero().flatten()
    for _, up in lay.ups:
        if lay.conv1d:
            _slice(up, 1, idx, bias=False)
            if up.bias is not None:
                up.bias = _param(up.bias.index_select(0, idx.to(up.bias.device)), up.bias)
        else:
            _slice(up, 0, idx, bias=True)
    _slice(lay.down[1], 0 if lay.conv1d else 1, idx, bias=False)
    if isinstance(getattr(lay.module, "intermediate_size", None), int):
        lay.module.intermediate_size = int(keep.sum())
    return int(keep.sum())


def _never_empty(kind: str, lay, keep: torch.Tensor) -> torch.Tensor:
    if keep.any():
        return keep
    score = StructRep(kind, lay.name, members_of(lay, 0), lay.count).contiguous_values().cpu()
    keep = torch.zeros_like(keep)
    keep[int(score.argmax())] = True
    warnings.warn(f"the ticket removes every {'head' if kind == 'heads' else 'neuron'} of "
                  f"{lay.name}; kept the one with the largest score so the layer still runs",
                  stacklevel=3)
    return keep


_FFN_CONFIG = ("intermediate_size", "n_inner", "hidden_dim", "ffn_dim")


def _update_config(new: nn.Module, heads: dict, groups: dict, head_dim: dict, ffn: dict) -> bool:
    """Write uniform counts into the config when the class then rebuilds these shapes."""
    cfg = getattr(new, "config", None)
    if cfg is None or not hasattr(type(new), "config_class") or not (heads or ffn):
        return False
    cand = copy.deepcopy(cfg)
    if heads:
        if len(set(heads.values())) != 1 or len(set(groups.values())) != 1 \
                or len(set(head_dim.values())) != 1:
            return False
        cand.num_attention_heads = next(iter(heads.values()))
        cand.head_dim = next(iter(head_dim.values()))
        if hasattr(cfg, "num_key_value_heads"):
            cand.num_key_value_heads = next(iter(groups.values()))
    if ffn:
        if len(set(ffn.values())) != 1:
            return False
        attr = next((a for a in _FFN_CONFIG if isinstance(getattr(cfg, a, None), int)), None)
        if attr is None:
            return False
        setattr(cand, attr, next(iter(ffn.values())))
    try:
        with torch.device("meta"):
            probe = type(new)(cand)
    except Exception:
        return False
    want = {n: tuple(t.shape) for n, t in new.state_dict().items()}
    got = {n: tuple(t.shape) for n, t in probe.state_dict().items()}
    if want != got:
        return False
    new.config = cand
    for mod in new.modules():  # submodules holding the old config object see the new one
        if getattr(mod, "config", None) is cfg:
            mod.config = cand
    return True


def prune_structures(model: nn.Module, ticket: Mapping, example_inputs=None) -> nn.Module:
    """A copy of ``model`` (same class) with the ticket's heads and FFN neurons removed."""
    if not isinstance(ticket, Mapping) or not ticket:
        raise ValueError("prune_channels: the ticket is empty or not a mapping; pass "
                         "search.ticket once search.found is True")
    masks = _names(model, ticket)  # tensor keys name the original's parameters
    new = copy.deepcopy(model)
    plan = structured_plan(new, masks)
    att, ffn, _ = _layouts(new)
    heads, groups, head_dim, neurons = {}, {}, {}, {}
    for lay in att:
        keep = plan.get(("heads", lay.name))
        if keep is None:
            continue
        keep = _never_empty("heads", lay, keep)
        head_dim[lay.name] = lay.head_dim
        groups[lay.name] = int(keep.sum())
        heads[lay.name] = _prune_heads(lay, keep)
    for lay in ffn:
        keep = plan.get(("ffn", lay.name))
        if keep is None:
            continue
        neurons[lay.name] = _prune_ffn(lay, _never_empty("ffn", lay, keep))
    if heads and len(heads) != len(att):  # layers the ticket leaves alone count too
        heads.update({lay.name: lay.n_heads for lay in att if lay.name not in heads})
    if neurons and len(neurons) != len(ffn):
        neurons.update({lay.name: lay.count for lay in ffn if lay.name not in neurons})
    new.worm_config_updated = _update_config(new, heads, groups, head_dim, neurons)
    if example_inputs is not None:  # the pruned model must run on what the dense one took
        with torch.no_grad():
            mode = new.training
            new.eval()
            _call(new, example_inputs)
            new.train(mode)
    return new


def load_pruned(dense: nn.Module, ticket: Mapping, state_dict: Mapping) -> nn.Module:
    """Rebuild a pruned model: ``dense`` built from the dense config (any weights), the
    ticket that pruned it, and the pruned model's state_dict (loaded strictly)."""
    new = prune_structures(dense, ticket)
    new.load_state_dict(state_dict, strict=True)
    return new


# ---------------------------------------------------------------- measuring
def _macs(model: nn.Module, x) -> int:
    """MACs of one forward: every Linear/Conv1D plus attention's QK^T and AV products."""
    conv1d = type(None)
    try:
        from transformers.pytorch_utils import Conv1D as conv1d
    except Exception:
        pass
    total, handles = [0], []
    att, _, _ = _layouts(model)
    qmods = {id(lay.proj["q"][1]): lay for lay in att}

    def hook(m, inp, out):
        total[0] += out.numel() * (m.in_features if isinstance(m, nn.Linear) else m.nx)
        lay = qmods.get(id(m))
        if lay is not None:  # scores and weighted sum: 2 * tokens * keys * heads * head_dim
            s = out.shape[-2] if out.dim() >= 3 else 1
            total[0] += 2 * out.shape[:-1].numel() * s * lay.n_heads * lay.head_dim

    for m in model.modules():
        if isinstance(m, (nn.Linear, conv1d)):
            handles.append(m.register_forward_hook(hook))
    try:
        with torch.no_grad():
            _call(model, x)
    finally:
        for h in handles:
            h.remove()
    return total[0]


def _batch(x, b: int):
    if isinstance(x, Mapping):
        return {k: _batch(v, b) for k, v in x.items()}
    if isinstance(x, torch.Tensor):
        return x[:1].expand(b, *x.shape[1:]).contiguous()
    return x


def transformer_report(dense: nn.Module, pruned: nn.Module, example_inputs, *,
                       batch_sizes: Sequence[int] = (1, 32), reps: int = 5,
                       min_time: float = 0.2, threads: Optional[int] = None) -> dict:
    """:func:`worm.prune_report` for transformers: parameters, MACs (Linear layers and the
    attention products) per example and measured CPU latency per batch size.
    ``example_inputs``: a tensor (input_ids, pixel_values) or a dict of model kwargs;
    its first row is repeated to each batch size."""
    one = _batch(example_inputs, 1)
    models = {k: copy.deepcopy(m).cpu().eval() for k, m in (("dense", dense), ("pruned", pruned))}
    rep = {f"params_{k}": sum(p.numel() for p in m.parameters()) for k, m in models.items()}
    rep.update({f"flops_{k}": _macs(m, one) for k, m in models.items()})
    rep["params_kept"] = rep["params_pruned"] / max(rep["params_dense"], 1)
    rep["flops_kept"] = rep["flops_pruned"] / max(rep["flops_dense"], 1)
    timed = dense_vs_pruned(models, lambda b: _batch(example_inputs, b), batch_sizes, reps,
                            min_time, threads)
    lat_txt = timed.pop("text")
    rep.update(timed)
    rep["text"] = (f"params {rep['params_dense']:,} -> {rep['params_pruned']:,} "
                   f"({100 * rep['params_kept']:.1f}% kept); MACs {rep['flops_dense']:,} -> "
                   f"{rep['flops_pruned']:,} ({100 * rep['flops_kept']:.1f}% kept); CPU latency {lat_txt}")
    return rep
