"""What a calibrator did to the decisions (theory.md §6): flips of the argmax and changes of the ranking.

Over valid voxels: flip = the argmax changed; harmful = correct -> wrong, beneficial = wrong -> correct,
neutral = wrong -> a different wrong class. Order change = the full ranking of classes changed, rankings
taken descending with ties broken by the lower class index (a stable sort).
"""

from __future__ import annotations

import torch

PRESERVATION_KEYS = ("flip_rate", "harmful_flip_rate", "beneficial_flip_rate", "neutral_flip_rate",
                     "order_change_rate", "dice_mean_delta")


def ranking(logits: torch.Tensor) -> torch.Tensor:
    """Class indices by decreasing logit, ties by lower index: (C, s)."""
    return torch.sort(logits, dim=0, descending=True, stable=True).indices


class PreservationState:
    """Counts of flips and order changes (int64, mergeable)."""

    def __init__(self, device="cpu"):
        # voxels, harmful, beneficial, neutral, order changed
        self.counts = torch.zeros(5, dtype=torch.int64, device=device)

    def add(self, before_logits: torch.Tensor, after_logits: torch.Tensor, before_pred: torch.Tensor,
            after_pred: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """Add s voxels: logits (C, s) before / after calibration, their argmax, labels; only the voxels
        `valid` (int64 indices, None: all) count."""
        order_changed = (ranking(before_logits) != ranking(after_logits)).any(0)
        if valid is not None:
            before_pred, after_pred, labels, order_changed = (
                t.index_select(0, valid) for t in (before_pred, after_pred, labels, order_changed))
        flipped = before_pred != after_pred
        was_right = before_pred == labels
        now_right = after_pred == labels
        self.counts += torch.stack([
            torch.tensor(labels.shape[0], device=labels.device),
            (flipped & was_right).sum(),
            (flipped & now_right).sum(),
            (flipped & ~was_right & ~now_right).sum(),
            order_changed.sum(),
        ]).to(self.counts.device)

    def merge(self, other: "PreservationState") -> "PreservationState":
        self.counts += other.counts.to(self.counts.device)
        return self

    def compute(self, dice_before: list, dice_after: list, dice_mean_before: float,
                dice_mean_after: float) -> dict:
        n, harmful, beneficial, neutral, order = (int(v) for v in self.counts.tolist())
        rate = (lambda k: k / n) if n else (lambda k: float("nan"))
        return {
            "flip_rate": rate(harmful + beneficial + neutral),
            "harmful_flip_rate": rate(harmful),
            "beneficial_flip_rate": rate(beneficial),
            "neutral_flip_rate": rate(neutral),
            "order_change_rate": rate(order),
            "dice_mean_delta": dice_mean_after - dice_mean_before,
            "dice_delta": [None if (a is None or b is None) else a - b for b, a in zip(dice_before, dice_after)],
            "flips": harmful + beneficial + neutral,
            "harmful_flips": harmful,
            "beneficial_flips": beneficial,
            "neutral_flips": neutral,
            "order_changes": order,
        }
