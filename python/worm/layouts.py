"""Where a transformer keeps its heads and FFN neurons: the layouts worm knows.

An :class:`AttnLayout` names an attention layer's Q, K, V and output projections and
its head geometry; an :class:`FfnLayout` an FFN block's up (and gate) projections and
its down projection. Both list, through ``entries()``, every parameter entry their
structures own, which :mod:`worm.heads` (scores, masks) and
:mod:`worm.prune_transformer` (slicing) share.

Attention layouts (found by attribute names and module types, as :mod:`worm.qk`):

* ``q_proj/k_proj/v_proj`` + ``o_proj`` | ``out_proj`` | ``dense`` (Llama, Mistral,
  Qwen2, ViT in transformers 5, OPT, ...), GQA when K has fewer rows than Q;
* ``q_lin/k_lin/v_lin/out_lin`` (DistilBERT);
* ``query/key/value`` with the parent's ``output.dense`` (BERT, RoBERTa, ELECTRA,
  ViT in transformers 4);
* GPT-2's packed ``c_attn`` (``Conv1D``, columns ``[Q | K | V]``) and ``c_proj``.

FFN layouts: ``gate_proj/up_proj/down_proj``, ``up_proj/down_proj``, ``fc1/fc2``,
``lin1/lin2``, ``c_fc/c_proj`` (Conv1D), ``dense_h_to_4h/dense_4h_to_h`` and BERT's
``intermediate.dense`` + ``output.dense``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import nn

from .qk import _conv1d_type, qk_reps

__all__ = ["AttnLayout", "FfnLayout", "attention_layouts", "ffn_layouts"]

_HEAD_DIM_ATTRS = ("head_dim", "attention_head_size", "dim_per_head", "head_size")
_NUM_HEAD_ATTRS = ("num_heads", "num_attention_heads", "n_heads", "n_head")
_SEPARATE = (("q_proj", "k_proj", "v_proj", ("o_proj", "out_proj", "dense")),
             ("q_lin", "k_lin", "v_lin", ("out_lin",)),
             ("query", "key", "value", ("out_proj", "dense")))
_FFN = (("gate_proj", "up_proj", "down_proj"), ("up_proj", "down_proj"), ("fc1", "fc2"),
        ("lin1", "lin2"), ("c_fc", "c_proj"), ("dense_h_to_4h", "dense_4h_to_h"),
        ("w1", "w3", "w2"))

FIX = ("use layers='qk' (unstructured Q/K entries) or pass layers=[...] yourself; to add a "
       "layout, see worm/layouts.py")


@dataclass(eq=False)
class AttnLayout:
    name: str                 # the module holding the head attributes
    module: nn.Module
    proj: dict                # {"q"|"k"|"v"|"o": (path, module)}
    head_dim: int
    n_heads: int
    n_kv: int
    packed: bool = False      # GPT-2 c_attn: Q, K and V columns of one Conv1D

    @property
    def count(self) -> int:   # structures: one per K/V group (== heads without GQA)
        return self.n_kv

    @property
    def group(self) -> int:   # query heads per K/V group
        return self.n_heads // self.n_kv

    def entries(self):
        """(param, name, dim, start, size, scored) for every entry block a group owns."""
        d, g = self.head_dim, self.group
        out = []
        if self.packed:
            path, c_attn = self.proj["q"]
            h = self.n_heads * d
            for i, s in enumerate((0, h, 2 * h)):
                out.append((c_attn.weight, f"{path}.weight", 1, s, d, i < 2))
                if c_attn.bias is not None:
                    out.append((c_attn.bias, f"{path}.bias", 0, s, d, False))
            opath, o = self.proj["o"]
            out.append((o.weight, f"{opath}.weight", 0, 0, d, False))
            return out
        for key, size in (("q", g * d), ("k", d), ("v", d)):
            path, lin = self.proj[key]
            out.append((lin.weight, f"{path}.weight", 0, 0, size, key != "v"))
            if lin.bias is not None:
                out.append((lin.bias, f"{path}.bias", 0, 0, size, False))
        opath, o = self.proj["o"]
        out.append((o.weight, f"{opath}.weight", 1, 0, g * d, False))
        return out


@dataclass(eq=False)
class FfnLayout:
    name: str
    module: nn.Module
    ups: list                 # [(path, module)]: up (and gate) projections
    down: tuple               # (path, module)
    conv1d: bool
    count: int                # neurons

    def entries(self):
        out = []
        for path, up in self.ups:
            out.append((up.weight, f"{path}.weight", 1 if self.conv1d else 0, 0, 1, True))
            if up.bias is not None:
                out.append((up.bias, f"{path}.bias", 0, 0, 1, False))
        path, down = self.down
        out.append((down.weight, f"{path}.weight", 0 if self.conv1d else 1, 0, 1, True))
        return out


def _attr(mod: nn.Module, names) -> Optional[int]:
    for a in names:
        v = getattr(mod, a, None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


def _head_dim(mod: nn.Module, q_rows: int) -> Optional[int]:
    d = _attr(mod, _HEAD_DIM_ATTRS)
    cfg = getattr(mod, "config", None)
    if d is None and cfg is not None:
        d = _attr(cfg, ("head_dim",))
    if d is None:
        n = _attr(mod, _NUM_HEAD_ATTRS) or (cfg is not None and _attr(cfg, _NUM_HEAD_ATTRS))
        d = q_rows // n if n and q_rows % n == 0 else None
    return d


def _separate(path: str, mod: nn.Module, parent: Optional[tuple]) -> Optional[AttnLayout]:
    pre = f"{path}." if path else ""
    for q, k, v, outs in _SEPARATE:
        sub = [getattr(mod, a, None) for a in (q, k, v)]
        if not all(isinstance(s, nn.Linear) for s in sub):
            continue
        o = next(((f"{pre}{a}", getattr(mod, a)) for a in outs
                  if isinstance(getattr(mod, a, None), nn.Linear)), None)
        if o is None and parent is not None:  # BERT: BertAttention.output.dense
            ppath, pmod = parent
            dense = getattr(getattr(pmod, "output", None), "dense", None)
            if isinstance(dense, nn.Linear):
                o = (f"{ppath}.output.dense" if ppath else "output.dense", dense)
        if o is None:
            return None
        d = _head_dim(mod, sub[0].out_features)
        if d is None or sub[0].out_features % d or sub[1].out_features % d \
                or sub[1].out_features != sub[2].out_features or o[1].in_features != sub[0].out_features:
            return None
        nh, nkv = sub[0].out_features // d, sub[1].out_features // d
        if nh % nkv:
            return None
        proj = {"q": (pre + q, sub[0]), "k": (pre + k, sub[1]), "v": (pre + v, sub[2]), "o": o}
        return AttnLayout(path, mod, proj, d, nh, nkv)
    return None


def _gpt2(path: str, mod: nn.Module, conv1d) -> Optional[AttnLayout]:
    c_attn, c_proj = getattr(mod, "c_attn", None), getattr(mod, "c_proj", None)
    if conv1d is None or not isinstance(c_attn, conv1d) or not isinstance(c_proj, conv1d):
        return None
    d = _attr(mod, ("head_dim",))
    w = c_attn.weight.shape[1]
    if d is None or w % (3 * d) or hasattr(mod, "q_attn"):
        return None
    pre = f"{path}." if path else ""
    n = w // (3 * d)
    return AttnLayout(path, mod, {"q": (pre + "c_attn", c_attn), "o": (pre + "c_proj", c_proj)},
                      d, n, n, packed=True)


def attention_layouts(model: nn.Module) -> list:
    """Every self-attention layer's layout, in module order; an error naming the fix
    for cross-attention, interleaved packs or layouts not listed in the module doc."""
    n_attn = len(qk_reps(model)) // 2  # its errors cover cross-attention and unknown packs
    conv1d = _conv1d_type()
    mods = dict(model.named_modules())
    found, taken = [], []
    for path, mod in mods.items():
        if any(path.startswith(t + ".") for t in taken):
            continue
        parent_path = path.rsplit(".", 1)[0] if "." in path else ""
        parent = (parent_path, mods[parent_path]) if path and parent_path in mods else None
        lay = _separate(path, mod, parent) or _gpt2(path, mod, conv1d)
        if lay is not None:
            found.append(lay)
            taken.append(path)
    if len(found) != n_attn:
        known = {lay.name for lay in found}
        raise ValueError(f"layers='heads': {type(model).__name__} has {n_attn} attention layers "
                         f"but worm recognises the head layout (Q/K/V, output projection and "
                         f"head_dim) of {len(found)} ({sorted(known)[:3]}...): {FIX}")
    return found


def _ffn(path: str, mod: nn.Module, conv1d) -> Optional[FfnLayout]:
    pre = f"{path}." if path else ""
    for names in _FFN:
        sub = [getattr(mod, a, None) for a in names]
        is_conv = conv1d is not None and all(isinstance(s, conv1d) for s in sub)
        if not (all(isinstance(s, nn.Linear) for s in sub) or is_conv):
            continue
        ups, down = [(pre + a, s) for a, s in zip(names[:-1], sub[:-1])], (pre + names[-1], sub[-1])
        if names == ("w1", "w3", "w2"):
            ups, down = [(pre + "w1", sub[0]), (pre + "w3", sub[1])], (pre + "w2", sub[2])
        if is_conv:
            n = {u.weight.shape[1] for _, u in ups} | {down[1].weight.shape[0]}
        else:
            n = {u.out_features for _, u in ups} | {down[1].in_features}
        if len(n) == 1:
            return FfnLayout(path, mod, ups, down, is_conv, n.pop())
    inter = getattr(getattr(mod, "intermediate", None), "dense", None)
    out = getattr(getattr(mod, "output", None), "dense", None)
    if isinstance(inter, nn.Linear) and isinstance(out, nn.Linear) \
            and inter.out_features == out.in_features and inter.in_features == out.out_features:
        return FfnLayout(path, mod, [(pre + "intermediate.dense", inter)],
                         (pre + "output.dense", out), False, inter.out_features)
    return None


def ffn_layouts(model: nn.Module) -> list:
    """Every FFN block's layout, in module order (one per transformer layer)."""
    conv1d = _conv1d_type()
    found, taken = [], []
    for path, mod in model.named_modules():
        if any(path.startswith(t + ".") for t in taken):
            continue
        if _is_attention(mod, conv1d):
            continue  # GPT-2's attention also holds a c_proj Conv1D
        lay = _ffn(path, mod, conv1d)
        if lay is not None:
            found.append(lay)
            taken.append(path)
    if not found:
        raise ValueError(f"layers='ffn' found no FFN block of a known layout in "
                         f"{type(model).__name__}: {FIX}")
    try:
        n_attn = len(qk_reps(model)) // 2
    except ValueError:
        n_attn = None
    if n_attn is not None and n_attn != len(found):
        raise ValueError(f"layers='ffn': {type(model).__name__} has {n_attn} attention layers but "
                         f"{len(found)} FFN blocks of a known layout; an FFN of another layout "
                         f"would be left out: {FIX}")
    return found


def _is_attention(mod: nn.Module, conv1d) -> bool:
    return conv1d is not None and isinstance(getattr(mod, "c_attn", None), conv1d)
