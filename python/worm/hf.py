"""Early-Bird / WORM inside a Hugging Face ``transformers.Trainer``.

::

    from worm.hf import WormCallback
    cb = WormCallback(mode="worm", every=None, retrain_epochs=1)   # per-epoch sampling
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[cb])
    trainer.train()
    cb.found_at, cb.ticket            # where the ticket was found, a worm.Ticket

The callback builds :class:`worm.EarlyBird` on the Trainer's own optimizer (AdamW by
default; truncation then runs as a step pre-hook on the unwrapped torch optimizer, so
it acts after gradient clipping and before the update), samples a mask at each epoch
end or every ``every`` optimizer steps, logs ``worm/d_max``, ``worm/d_avg`` and
``worm/truncating`` to ``trainer.state.log_history``, and once the ticket is found
applies it with :func:`worm.apply_masks` (pruned weights stay exactly zero) and
retrains, or stops.

The same in a plain PyTorch loop::

    search = worm.EarlyBird(model, opt, mode="worm", layers="qk", window=3,
                            stop=0.01, delta=0.005, r=3e-3)
    for epoch in range(max_epochs):
        train_one_epoch(model, opt)               # truncation rides on opt.step()
        if search.step().found:
            break
    search.close()
    worm.apply_masks(model, search.ticket, opt)   # then retrain with the masks kept
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from transformers import TrainerCallback

from .search import EarlyBird
from .ticket import apply_masks

__all__ = ["WormCallback", "unwrap_optimizer"]


def unwrap_optimizer(optimizer):
    """The torch optimizer inside accelerate's (or another) wrapper.

    accelerate's ``AcceleratedOptimizer`` forwards ``step()`` to ``.optimizer``; hooks
    must sit on that inner optimizer, whose ``step`` is the one that really runs.
    """
    seen = 0
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer) and seen < 8:
        optimizer, seen = optimizer.optimizer, seen + 1
    return optimizer


def _unwrap_model(model):
    return getattr(model, "module", model) if isinstance(
        model, (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)) else model


class WormCallback(TrainerCallback):
    """Early-Bird ticket search (``mode="eb"``) or WORM (``"worm"``) during ``Trainer.train``.

    Args:
        mode, layers, prune_ratio, window, stop, delta, r, scope: as :class:`worm.EarlyBird`
            (defaults: the paper's BERT settings, query/key weights as the representative set).
        every: sample every ``every`` optimizer steps; None samples at each epoch end.
        stop_at_ticket: stop training when the ticket is found (unless retraining is asked for).
        apply_ticket: apply the ticket with :func:`worm.apply_masks` once found.
        retrain_epochs: None (stop at the ticket when ``stop_at_ticket``), an int (train that
            many more epochs with the ticket applied, then stop), or ``"continue"`` (train to
            the Trainer's own end).
    """

    def __init__(self, mode: str = "worm", layers="qk", prune_ratio: float = 0.5, window: int = 3,
                 stop: float = 0.01, delta: float = 0.005, r: float = 3e-3, scope: str = "global",
                 every: Optional[int] = None, stop_at_ticket: bool = True, apply_ticket: bool = True,
                 retrain_epochs: Union[None, int, str] = None):
        if every is not None and (int(every) != every or every < 1):
            raise ValueError(f"every must be a positive number of optimizer steps or None, got {every!r}")
        if not (retrain_epochs is None or retrain_epochs == "continue"
                or (isinstance(retrain_epochs, (int, float)) and retrain_epochs >= 0)):
            raise ValueError(f"retrain_epochs must be None, a number of epochs >= 0 or 'continue', "
                             f"got {retrain_epochs!r}")
        self.settings = dict(mode=mode, layers=layers, prune_ratio=prune_ratio, window=window,
                             stop=stop, delta=delta, r=r, scope=scope)
        if mode not in ("worm", "eb", "truncate"):
            raise ValueError(f"mode must be 'worm', 'eb' or 'truncate', got {mode!r}")
        self.every = every
        self.stop_at_ticket, self.apply_ticket = stop_at_ticket, apply_ticket
        self.retrain_epochs = retrain_epochs
        self.search: Optional[EarlyBird] = None
        self.found_at: Optional[dict] = None     # {"step", "epoch", "sample"} once found
        self.ticket = None                       # a worm.Ticket once found
        self.mask_handle = None
        self.log: list = []                      # one dict per sampling step
        self._retrain_until: Optional[float] = None
        self._pending_state: Optional[dict] = None
        self._model = self._optimizer = None

    # ------------------------------------------------------------- set-up
    def _ensure_search(self, kwargs) -> bool:
        if self.search is not None:
            return True
        opt, model = kwargs.get("optimizer"), kwargs.get("model")
        if opt is None or model is None:
            return False  # the Trainer creates its optimizer later; retry at the next event
        self._model, self._optimizer = _unwrap_model(model), unwrap_optimizer(opt)
        # Sampling is driven from the callback events (every=None here), so the Trainer's
        # global_step, epoch and stop control stay the single source of truth.
        self.search = EarlyBird(self._model, self._optimizer, every=None, **self.settings)
        if self._pending_state is not None:
            self._load_now(self._pending_state)
            self._pending_state = None
        return True

    def on_train_begin(self, args, state, control, **kwargs):
        self._ensure_search(kwargs)

    def on_step_begin(self, args, state, control, **kwargs):
        self._ensure_search(kwargs)

    # ------------------------------------------------------------- sampling
    def _sample(self, state, control) -> None:
        rec = self.search.step()
        entry = {"worm/sample": rec.index, "worm/d_max": rec.d_max, "worm/d_avg": rec.d_avg,
                 "worm/truncating": rec.truncating, "worm/found": rec.found,
                 "epoch": state.epoch, "step": state.global_step}
        self.log.append(entry)
        state.log_history.append(dict(entry))
        if rec.found:
            self._on_found(state, control, rec)

    def _on_found(self, state, control, rec) -> None:
        self.found_at = {"step": state.global_step, "epoch": state.epoch, "sample": rec.index}
        self.ticket = self.search.ticket
        self.search.close()  # truncation is off once found; drop its hooks
        if self.apply_ticket:
            self.mask_handle = apply_masks(self._model, self.ticket, self._optimizer)
        if self.retrain_epochs == "continue" or not self.stop_at_ticket:
            return
        if self.retrain_epochs is None or self.retrain_epochs == 0:
            control.should_training_stop = True
        else:
            self._retrain_until = (state.epoch or 0.0) + float(self.retrain_epochs)

    def _past_retraining(self, state) -> bool:
        # epoch is a float that should land on the target; tolerate its rounding.
        return self._retrain_until is not None and state.epoch is not None \
            and state.epoch >= self._retrain_until - 1e-6

    def on_step_end(self, args, state, control, **kwargs):
        if self.search is None:
            return control
        if self.found_at is None and self.every is not None and state.global_step % self.every == 0:
            self._sample(state, control)
        elif self._past_retraining(state):
            control.should_training_stop = True
        return control

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.search is None:
            return control
        if self.found_at is None and self.every is None:
            self._sample(state, control)
        elif self._past_retraining(state):
            control.should_training_stop = True
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if self.search is not None and self.found_at is None:
            self.search.close()  # no ticket: leave the optimizer as the user gave it

    # ------------------------------------------------------------- resume
    def state_dict(self) -> dict:
        """The search, where the ticket was found and the sampling log (not the masks' hooks)."""
        return {"search": None if self.search is None else self.search.state_dict(),
                "found_at": self.found_at, "log": list(self.log),
                "retrain_until": self._retrain_until}

    def _load_now(self, sd: dict) -> None:
        if sd.get("search") is not None:
            self.search.load_state_dict(sd["search"])
        self.found_at, self.log = sd.get("found_at"), list(sd.get("log", []))
        self._retrain_until = sd.get("retrain_until")
        if self.found_at is not None:
            self.ticket = self.search.ticket
            self.search.close()
            if self.apply_ticket:
                self.mask_handle = apply_masks(self._model, self.ticket, self._optimizer)

    def load_state_dict(self, sd: dict) -> None:
        """Restore before ``trainer.train(resume_from_checkpoint=...)``; applied once the search exists."""
        if self.search is None:
            self._pending_state = sd
        else:
            self._load_now(sd)
