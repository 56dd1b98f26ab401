"""worm: Early-Bird lottery-ticket search with WORM gradient truncation.

See README.md; the semantics are written down in docs/method.md and implemented by
:mod:`worm.reference`, the oracle every kernel is tested against. The kernels' contract
is the ops ``torch.ops.worm.*`` of :mod:`worm.ops` (docs/ops.md).
"""
from . import ops, reference
from .ops import backend, backend_info
from .optim import WormSGD, truncation_pre_hook
from .search import EarlyBird, Record
from .ticket import Ticket, apply_masks, remove_masks
from .prune import prune_channels, prune_report
from .prune_transformer import load_pruned
from .bn import recalibrate_bn

__version__ = "0.1.0"

__all__ = [
    "ops", "reference", "backend", "backend_info", "WormSGD", "truncation_pre_hook",
    "EarlyBird", "Record", "Ticket", "apply_masks", "remove_masks", "prune_channels",
    "prune_report", "load_pruned", "recalibrate_bn",
]
