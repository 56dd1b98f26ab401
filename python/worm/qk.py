"""The transformer representative set: attention query and key projection weights.

The paper (section 6) ranks the entries of every self-attention layer's query and
key weight matrices, unstructured, and leaves the value projection alone. Biases
are not representative: they are few, carry no connection, and the paper masks
weights only; their gradients are never truncated either.

Layouts recognised, by module type and attribute names (never by parameter-name
pattern alone, so a renamed layer cannot slip in or out unnoticed):

* separate ``nn.Linear`` projections, checked by the triple of attribute names
  ``query/key/value`` (BERT, RoBERTa, ViT, ELECTRA ...), ``q_lin/k_lin/v_lin``
  (DistilBERT), ``q_proj/k_proj/v_proj`` (Llama, Mistral, Qwen, OPT, GPT-J, BART
  encoders ...), ``q/k/v`` (T5 encoders);
* GPT-2's packed ``c_attn`` (``Conv1D``, weight stored transposed ``[in, 3h]``):
  Q is ``weight[:, :h]``, K is ``weight[:, h:2h]``, V (``[:, 2h:]``) untouched;
* Phi-3's packed ``qkv_proj`` (``nn.Linear``, rows ``[Q (nh*d); K (nkv*d); V]``);
* ``torch.nn.MultiheadAttention``: rows ``[Q; K; V]`` of ``in_proj_weight``, or its
  separate ``q_proj_weight`` / ``k_proj_weight``.

Refused with an error (pass ``layers=[...]`` yourself): cross-attention (its keys
come from another sequence, so a ticket over it means something else), GPT-NeoX /
Pythia / BLOOM / Falcon ``query_key_value`` (Q, K and V rows interleave per head,
and Falcon's grouping depends on its config), and any attention module of a type
not listed here.
"""
from __future__ import annotations

from typing import Optional

from torch import nn

from .rep import RepTensor

__all__ = ["qk_reps"]

# (query, key, value) attribute names of separate projections.
_SEPARATE = (("query", "key", "value"), ("q_lin", "k_lin", "v_lin"),
             ("q_proj", "k_proj", "v_proj"), ("q", "k", "v"))

# Child names under which a model keeps an attention over another sequence.
_CROSS_NAMES = {"crossattention", "cross_attention", "cross_attn", "encoder_attn",
                "encdecattention", "multihead_attn", "src_attn"}

# Packed Q/K/V layouts we know to be interleaved or config-dependent.
_INTERLEAVED = {"query_key_value", "qkv", "Wqkv", "W_pack"}


def _hint(model: nn.Module) -> str:
    return (f"pass layers=[...] yourself (tensors, modules, or worm.layers.RepTensor "
            f"with an index slice for packed weights) for {type(model).__name__}")


def _conv1d_type():
    try:
        from transformers.pytorch_utils import Conv1D
    except Exception:  # transformers absent or reorganised: no GPT-2 layout to find
        return None
    return Conv1D


def _is_cross(name: str, mod: nn.Module) -> bool:
    leaf = name.rsplit(".", 1)[-1].lower()
    return (leaf in _CROSS_NAMES or bool(getattr(mod, "is_cross_attention", False))
            or "cross" in type(mod).__name__.lower())


def _separate(mod: nn.Module) -> Optional[tuple]:
    for q, k, v in _SEPARATE:
        sub = [getattr(mod, a, None) for a in (q, k, v)]
        if all(isinstance(s, nn.Linear) for s in sub):
            return q, k
    return None


def _match(name: str, mod: nn.Module, conv1d) -> Optional[list]:
    """The Q and K RepTensors of ``mod`` if it is an attention layer of a known layout."""
    pre = f"{name}." if name else ""
    names = _separate(mod)
    if names is not None:
        q, k = names
        return [RepTensor(getattr(mod, q).weight, f"{pre}{q}.weight"),
                RepTensor(getattr(mod, k).weight, f"{pre}{k}.weight")]
    c_attn = getattr(mod, "c_attn", None)
    if conv1d is not None and isinstance(c_attn, conv1d):
        # split_size: Q's width, the embedding's unless heads were pruned (worm.prune_transformer)
        h = getattr(mod, "split_size", None) or getattr(mod, "embed_dim", None)
        if h is None or c_attn.weight.shape[1] != 3 * h or hasattr(mod, "q_attn"):
            return None  # GPT-2 cross-attention packs only K and V here: not ours
        w = c_attn.weight
        return [RepTensor(w, f"{pre}c_attn.weight[:, 0:{h}]", (slice(None), slice(0, h))),
                RepTensor(w, f"{pre}c_attn.weight[:, {h}:{2 * h}]", (slice(None), slice(h, 2 * h)))]
    if type(mod).__name__.startswith("Phi3") and isinstance(getattr(mod, "qkv_proj", None), nn.Linear):
        d = mod.head_dim
        nq = mod.config.num_attention_heads * d
        nk = mod.num_key_value_heads * d
        w = mod.qkv_proj.weight
        if w.shape[0] != nq + 2 * nk:
            return None
        return [RepTensor(w, f"{pre}qkv_proj.weight[0:{nq}]", (slice(0, nq),)),
                RepTensor(w, f"{pre}qkv_proj.weight[{nq}:{nq + nk}]", (slice(nq, nq + nk),))]
    if isinstance(mod, nn.MultiheadAttention):
        e = mod.embed_dim
        if mod.in_proj_weight is not None:
            w = mod.in_proj_weight
            return [RepTensor(w, f"{pre}in_proj_weight[0:{e}]", (slice(0, e),)),
                    RepTensor(w, f"{pre}in_proj_weight[{e}:{2 * e}]", (slice(e, 2 * e),))]
        return [RepTensor(mod.q_proj_weight, f"{pre}q_proj_weight"),
                RepTensor(mod.k_proj_weight, f"{pre}k_proj_weight")]
    return None


def _looks_like_attention(mod: nn.Module) -> bool:
    cls = type(mod).__name__
    return isinstance(mod, nn.MultiheadAttention) or cls.endswith("Attention") \
        or any(isinstance(getattr(mod, a, None), nn.Module) for a in _INTERLEAVED)


def qk_reps(model: nn.Module) -> list:
    """Query then key weight of every self-attention layer, layer by layer.

    Raises ``ValueError`` naming the model class when it holds cross-attention, a
    packed layout we cannot slice safely, or no recognisable attention at all.
    """
    conv1d = _conv1d_type()
    reps, matched = [], []
    mods = list(model.named_modules())
    by_name = dict(mods)

    def ancestors(name: str):
        parts = name.split(".")
        return [(n, by_name[n]) for n in (".".join(parts[:i]) for i in range(1, len(parts)))
                if n in by_name]
    for name, mod in mods:
        if any(name.startswith(m + ".") for m in matched):
            continue  # inside an attention layer already taken (its own q/k Linears)
        found = _match(name, mod, conv1d)
        if found is None:
            continue
        if _is_cross(name, mod) or any(_is_cross(n, m) for n, m in ancestors(name)):
            raise ValueError(f"layers='qk': {type(model).__name__} has cross-attention at "
                             f"{name!r}; its keys come from another sequence, so worm does not "
                             f"pick a representative set for it: {_hint(model)}")
        matched.append(name)
        reps.extend(found)

    # Ancestors of a match (BertAttention around BertSelfAttention) and the match's own
    # children are accounted for; any other attention-like module is not.
    covered = set(matched)
    for m in matched:
        covered.update(n for n, _ in ancestors(m))

    for name, mod in mods:
        if not name or name in covered or any(name.startswith(m + ".") for m in matched):
            continue
        packed = [a for a in _INTERLEAVED if isinstance(getattr(mod, a, None), nn.Module)]
        if packed:
            raise ValueError(f"layers='qk': {type(model).__name__} packs Q, K and V in "
                             f"{name}.{packed[0]} with a per-head interleaved or config-dependent "
                             f"layout that worm does not slice automatically: {_hint(model)}")
        if _looks_like_attention(mod):
            if _is_cross(name, mod):
                raise ValueError(f"layers='qk': {type(model).__name__} has cross-attention at "
                                 f"{name!r} ({type(mod).__name__}): {_hint(model)}")
            raise ValueError(f"layers='qk': {type(model).__name__} has an attention module of "
                             f"unknown layout at {name!r} ({type(mod).__name__}): {_hint(model)}")
    if not reps:
        raise ValueError(f"layers='qk' found no attention query/key projection in "
                         f"{type(model).__name__}: {_hint(model)}")
    return reps
