"""DTensor helpers shared by the sharded search's modules (no process group needed)."""
from __future__ import annotations

__all__ = ["is_dtensor", "local", "local_numel", "world"]


def _dtensor_cls():
    try:
        from torch.distributed.tensor import DTensor
    except Exception:  # torch built without distributed
        return None
    return DTensor


def is_dtensor(t) -> bool:
    cls = _dtensor_cls()
    return cls is not None and isinstance(t, cls)


def local(t):
    """The local shard of a DTensor (an alias: in-place edits reach the DTensor), else ``t``."""
    return t.to_local() if is_dtensor(t) else t


def local_numel(t) -> int:
    return local(t).numel()


def world() -> int:
    """Ranks in the default process group (1 without one)."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size()
