"""Is the search still looking at the model's parameters?

A search holds the tensors it was built on. Built before ``fully_shard`` (which swaps
every parameter for a DTensor), before ``load_state_dict(..., assign=True)`` or any
other change that replaces parameters, it would keep sampling tensors that training
no longer updates: distances 0, a false ticket. :func:`owners` records, when the
search is built, which model attribute holds each representative tensor;
:func:`check` (every sampling step, a few attribute reads) raises if one of them now
holds another tensor.
"""
from __future__ import annotations

from typing import Optional

__all__ = ["owners", "check"]


def owners(model, reps) -> list:
    """[(rep index, parameter name in model)] for reps whose tensor is a model parameter."""
    if model is None:
        return []
    names = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), n)
    return [(i, names[id(r.param)]) for i, r in enumerate(reps) if id(r.param) in names]


def stale(model, reps, recorded) -> Optional[str]:
    """A message naming the first representative tensor that is no longer its parameter."""
    for i, name in recorded:
        try:
            now = model.get_parameter(name)
        except AttributeError:
            now = None
        if now is not reps[i].param:
            return (f"representative tensor {reps[i].name} is no longer the model's parameter "
                    f"{name!r} (the model's parameters were replaced after the search was built: "
                    "fully_shard, load_state_dict(..., assign=True), to_empty(), ...); the search "
                    "would sample tensors training no longer updates. Build the EarlyBird search "
                    "after the model is final (after fully_shard / loading)")
    return None


def check(model, reps, recorded) -> None:
    msg = stale(model, reps, recorded)
    if msg is not None:
        raise RuntimeError(msg)
