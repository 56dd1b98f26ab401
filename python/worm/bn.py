"""Fresh BatchNorm statistics for a model whose weights changed under them.

Pruning removes channels, and with them the inputs every later BN normalises; the
running mean and variance the model carries were gathered on the dense network
(and, with torch's default momentum 0.1, lag its last weights). In eval mode such a
model can sit at chance although its weights are fine. :func:`recalibrate_bn`
re-estimates the statistics from a few batches, as a BN with ``momentum=None`` does
(a cumulative average over the batches seen), and touches nothing else.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

__all__ = ["recalibrate_bn"]


def _inputs(batch):
    """The model input of one batch: a tensor, or the first item of an (x, y) pair."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    raise TypeError("recalibrate_bn: each batch must be an input tensor or an (inputs, targets) "
                    f"tuple/list whose first item is a tensor; got {type(batch).__name__}")


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches: Iterable) -> nn.Module:
    """Replace the running statistics of every BatchNorm in ``model`` by their
    cumulative average over ``batches`` (an iterable of input tensors or (x, y)
    tuples, e.g. a DataLoader). Returns ``model``.

    Weights, biases and every other buffer are untouched; each BN's ``momentum`` and
    every module's train/eval flag are restored afterwards (also when a forward
    raises). BNs without running statistics (``track_running_stats=False``) are left
    alone. The batches are run through the whole model under ``no_grad``, in train
    mode, so the statistics are those of the inputs each BN sees in this model.
    """
    bns = [m for m in model.modules()
           if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns:
        return model
    modes = {m: m.training for m in model.modules()}
    saved = {m: m.momentum for m in bns}
    # Forwards change the buffers in place; keep copies so a failure leaves them as they were.
    old = {m: (m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
           for m in bns}
    seen = 0
    try:
        for m in bns:
            m.reset_running_stats()
            m.momentum = None                       # cumulative average: 1 / num_batches_tracked
        model.train()
        dev = next((t.device for t in bns[0].buffers()), None)
        for batch in batches:
            x = _inputs(batch)
            model(x.to(dev) if dev is not None else x)
            seen += 1
        if seen == 0:
            raise ValueError("recalibrate_bn: batches is empty; pass at least one batch "
                             "(e.g. a few batches of the training data)")
    except BaseException:
        for m, (mean, var, n) in old.items():
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
            m.num_batches_tracked.copy_(n)
        raise
    finally:
        for m, mom in saved.items():
            m.momentum = mom
        for m, flag in modes.items():
            m.training = flag
    return model
