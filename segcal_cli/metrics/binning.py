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
    """Bin index of confidences (any float dtype, any device) under one rule.

    The index is arithmetic, `floor(v * B)`, then corrected by one comparison with each neighbouring edge
    (gathered from a table of the float32 edges in the values' dtype): `v * B` rounds, and the float32 edges
    are not always i/B, so the first guess can be one bin off near an edge, never more. The result equals
    a binary search against the edges (tested on every edge and its neighbours), at about 2x its speed.
    """

    def __init__(self, bins: int, rule: str):
        check_bins(bins, rule)
        self.bins = bins
        self.rule = rule
        self.num_bins = num_bins(bins, rule)
        # e_0 .. e_B and a sentinel above 1, so that idx + 1 is always a valid index
        self._table = torch.cat([bin_edges(bins), torch.tensor([2.0])])
        self._cache: dict = {}

    def edge_table(self, like: torch.Tensor) -> torch.Tensor:
        """The B + 2 edges e_0 .. e_B, 2 in `like`'s dtype and device (cached)."""
        key = (like.dtype, like.device)
        table = self._cache.get(key)
        if table is None:
            table = self._table.to(device=like.device, dtype=like.dtype)
            self._cache[key] = table
        return table

    def index(self, values: torch.Tensor) -> torch.Tensor:
        """int64 bin indices in [0, num_bins) of values in [0, 1]."""
        return bin_index(values, self.edge_table(values), self.bins, self.rule)

    def first_edge_exceeded(self, values: torch.Tensor) -> torch.Tensor:
        """Boolean mask of values outside bin 0 (the sparse part of classwise binning)."""
        if self.bins == 1:
            if self.rule == "torchmetrics":
                return values >= 1.0
            return torch.zeros_like(values, dtype=torch.bool)
        first = float(self.edge_table(values)[1])
        return values > first if self.rule == "right" else values >= first


def bin_index(values: torch.Tensor, table: torch.Tensor, bins: int, rule: str) -> torch.Tensor:
    """Binner.index against an edge table (Binner.edge_table) given explicitly; plain torch, so the compiled
    statistics (compiled.py) trace it as they are."""
    guess = (values * bins).long().clamp(0, bins - 1)  # v >= 0: truncation is floor
    lower = table[guess]  # e_guess
    upper = table[guess + 1]  # e_(guess+1)
    if rule == "right":  # (e_i, e_(i+1)]; 0 stays in bin 0
        idx = guess - ((values <= lower) & (guess > 0)).long() + (values > upper).long()
    else:  # [e_i, e_(i+1)); 1.0 in the top bin
        idx = guess - (values < lower).long() + ((values >= upper) & (guess < bins - 1)).long()
    idx = idx.clamp(0, bins - 1)
    if rule == "torchmetrics":
        idx = torch.where(values >= 1.0, bins, idx)
    return idx
