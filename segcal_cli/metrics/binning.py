"""Equal-width confidence bins and the three rules for values that lie exactly on an edge (theory.md §6).

Edges are the float32 values of `torch.linspace(0, 1, B + 1)`: the edges fiducio and torchmetrics use, so a
confidence that one of them sees as lying on an edge is binned here by the same rule. (torch's float32
linspace is not always the float nearest to i/B; following it is what makes the peers reproducible.)

* `right` (default): bin i holds (e_i, e_{i+1}], bin 0 also holds 0. fiducio, scikit-learn, MONAI, ValUES.
* `left`: bin i holds [e_i, e_{i+1}), the top bin also holds 1.0.
* `torchmetrics`: bin i holds [e_i, e_{i+1}) and 1.0 goes to an extra (B+1)-th bin of its own, as
  torchmetrics' `multiclass_calibration_error` does; that bin counts in ECE like any other.
"""

from __future__ import annotations

import torch

BIN_RULES = ("right", "left", "torchmetrics")


def check_bins(bins: int, rule: str) -> None:
    from segcal_cli.errors import InputError

    if rule not in BIN_RULES:
        raise InputError(f"--bin-rule must be one of {', '.join(BIN_RULES)}, not {rule!r}")
    if not isinstance(bins, int) or bins < 1:
        raise InputError(f"--bins must be a positive number of bins, not {bins}")


def num_bins(bins: int, rule: str) -> int:
    """Bins the state holds: B, or B + 1 for the torchmetrics rule (its hidden bin for 1.0)."""
    return bins + 1 if rule == "torchmetrics" else bins


def bin_edges(bins: int) -> torch.Tensor:
    """The B + 1 float32 edges in [0, 1]."""
    return torch.linspace(0.0, 1.0, bins + 1, dtype=torch.float32)


def bin_bounds(bins: int, rule: str) -> list[tuple[float, float]]:
    """(lo, hi) of every bin the state holds, for reports."""
    edges = bin_edges(bins).tolist()
    bounds = [(edges[i], edges[i + 1]) for i in range(bins)]
    if rule == "torchmetrics":
        bounds.append((1.0, 1.0))
    return bounds


class Binner:
    """Bin index of confidences (any float dtype, any device) under one rule."""

    def __init__(self, bins: int, rule: str):
        check_bins(bins, rule)
        self.bins = bins
        self.rule = rule
        self.num_bins = num_bins(bins, rule)
        self._inner = bin_edges(bins)[1:-1].contiguous()
        self._cache: dict = {}

    def _edges(self, like: torch.Tensor) -> torch.Tensor:
        key = (like.dtype, like.device)
        edges = self._cache.get(key)
        if edges is None:
            edges = self._inner.to(device=like.device, dtype=like.dtype)
            self._cache[key] = edges
        return edges

    def index(self, values: torch.Tensor) -> torch.Tensor:
        """int64 bin indices in [0, num_bins)."""
        inner = self._edges(values)
        if self.rule == "right":
            # bucketize(right=False) counts inner edges strictly below v: (e_i, e_{i+1}], 0 -> 0, 1.0 -> B-1
            return torch.bucketize(values, inner, right=False)
        idx = torch.bucketize(values, inner, right=True)  # inner edges <= v: [e_i, e_{i+1})
        if self.rule == "torchmetrics":
            idx = torch.where(values >= 1.0, self.bins, idx)
        return idx

    def first_edge_exceeded(self, values: torch.Tensor) -> torch.Tensor:
        """Boolean mask of values outside bin 0 (the sparse part of classwise binning)."""
        if self.bins == 1:
            if self.rule == "torchmetrics":
                return values >= 1.0
            return torch.zeros_like(values, dtype=torch.bool)
        first = self._edges(values)[0]
        return values > first if self.rule == "right" else values >= first
