"""The optimizer side of worm, in one import: WormSGD and truncation for any optimizer.

* :class:`WormSGD` (:mod:`worm.sgd`): ``torch.optim.SGD`` with truncation fused into
  its step.
* :class:`GradTruncation` / :func:`truncation_pre_hook` (:mod:`worm.truncation`): the
  same truncation for any other optimizer (AdamW, ...), by one step pre-hook.
* :func:`truncated` (:mod:`worm.hook_grad`): the gradient a truncating hook returns.
* The l1 penalty of network slimming: :mod:`worm.slimming`.
"""
from .hook_grad import truncated
from .sgd import WormSGD
from .truncation import GradTruncation, truncation_pre_hook

__all__ = ["WormSGD", "GradTruncation", "truncation_pre_hook", "truncated"]
