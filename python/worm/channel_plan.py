"""What :func:`worm.prune_channels` did: per ticket BN, the keep mask the ticket asked
for and the one the rebuilt model realises, and the model's size before and after.

The realised model may keep channels the ticket prunes: coupled BNs (a residual
stream, a concatenation) decide their shared channels together, grouped convs force
the same positions in every slice, and a floor or the never-empty rule puts channels
back. The plan states that departure in every text it gives.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional

import torch

__all__ = ["ChannelPlan"]


@dataclass
class ChannelPlan:
    """``ticket`` and ``realised`` hold each ticket BN's keep mask (names as in the
    model) before and after coupling and the floor; ``added`` counts channels kept
    against the ticket, ``removed`` channels removed against it (only
    ``coupled="vote"`` and grouped convs remove any); ``departure`` is
    (added + removed) / ticket BN channels. ``params`` / ``macs`` are the model's
    [before, after] (MACs for one forward of the example inputs)."""

    ticket: Dict[str, torch.Tensor] = field(default_factory=dict)
    realised: Dict[str, torch.Tensor] = field(default_factory=dict)
    coupled: str = "any"
    max_pruning_ratio: Optional[float] = None
    groups: int = 0            # DepGraph groups touched by the ticket
    coupled_groups: int = 0    # of which held more than one ticket BN
    params: Optional[list] = None
    macs: Optional[list] = None
    coupled_bns: set = field(default_factory=set)   # ticket BNs in a group with others
    grouped_conv_groups: int = 0  # groups cut alike in every slice of a grouped conv
    whole_groups: int = 0         # groups left whole (feeding part of a grouped conv)
    refilled: int = 0             # channels put back by the floor / never-empty rule

    @property
    def added(self) -> int:
        return sum(int((r & ~self.ticket[n]).sum()) for n, r in self.realised.items())

    @property
    def removed(self) -> int:
        return sum(int((~r & self.ticket[n]).sum()) for n, r in self.realised.items())

    @property
    def channels(self) -> int:
        return sum(t.numel() for t in self.ticket.values())

    @property
    def departure(self) -> float:
        return (self.added + self.removed) / max(self.channels, 1)

    @property
    def ticket_kept(self) -> int:
        return sum(int(t.sum()) for t in self.ticket.values())

    @property
    def realised_kept(self) -> int:
        return sum(int(r.sum()) for r in self.realised.values())

    def summary(self) -> dict:
        return {"coupled": self.coupled, "max_pruning_ratio": self.max_pruning_ratio,
                "groups": self.groups, "coupled_groups": self.coupled_groups,
                "ticket_channels": self.channels, "ticket_kept": self.ticket_kept,
                "realised_kept": self.realised_kept, "added": self.added,
                "removed": self.removed, "departure": self.departure,
                "grouped_conv_groups": self.grouped_conv_groups, "whole_groups": self.whole_groups,
                "refilled": self.refilled, "params": self.params, "macs": self.macs}

    def departure_text(self) -> str:
        """One paragraph: ticket vs realised channels, why they differ, params / MACs."""
        t, r, n = self.ticket_kept, self.realised_kept, self.channels
        more = f"{100 * (r - t) / t:+.0f}%" if t else "n/a"
        lines = [f"ticket keeps {t:,} of {n:,} BN channels ({100 * t / max(n, 1):.1f}%); the "
                 f"realised model keeps {r:,} ({100 * r / max(n, 1):.1f}%, {more} against the "
                 f"ticket): {self.added:,} kept beyond the ticket, {self.removed:,} removed "
                 f"against it; departure {100 * self.departure:.1f}% of the ticket's channels"]
        why = []
        if self.coupled_groups:
            why.append(f"{self.coupled_groups} of {self.groups} channel groups couple several BNs "
                       f"(residual adds, concatenations), decided by coupled={self.coupled!r}")
        if self.grouped_conv_groups:
            why.append(f"{self.grouped_conv_groups} groups pass a grouped conv: the same positions "
                       "are cut in every slice")
        if self.whole_groups:
            why.append(f"{self.whole_groups} groups feed part of a grouped conv and stay whole")
        if self.refilled:
            why.append(f"{self.refilled} channels put back so that no layer "
                       + ("loses more than max_pruning_ratio" if self.max_pruning_ratio is not None
                          else "empties"))
        if why and (self.added or self.removed):
            lines.append("  why: " + "; ".join(why))
        if self.params:
            b, a = self.params
            lines.append(f"  realised params {b:,} -> {a:,} ({100 * a / max(b, 1):.1f}% kept)"
                         + (f"; MACs {self.macs[0]:,} -> {self.macs[1]:,} "
                            f"({100 * self.macs[1] / max(self.macs[0], 1):.1f}% kept)" if self.macs else ""))
        return "\n".join(lines)

    def layer_table(self) -> str:
        """Per ticket BN: channels, kept by the ticket, kept in the realised model."""
        if not self.ticket:
            return "(no ticket BN)"
        w = max(len(n) for n in self.ticket)
        rows = [f"  {'layer':<{w}}  channels  ticket  realised  departure"]
        for n, t in self.ticket.items():
            r = self.realised.get(n, t)
            d = int((r ^ t).sum())
            rows.append(f"  {n:<{w}}  {t.numel():8d}  {int(t.sum()):6d}  {int(r.sum()):8d}  "
                        f"{d:4d}{' (coupled)' if d and n in self.coupled_bns else ''}")
        return "\n".join(rows)

    def text(self, per_layer: bool = False) -> str:
        return self.departure_text() + ("\n" + self.layer_table() if per_layer else "")

    def __str__(self) -> str:
        return self.text()
