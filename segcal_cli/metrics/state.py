"""MetricState: the mergeable sums behind every calibration and segmentation metric of `evaluate`.

`update` on a block, `merge` two states, `compute` at the end. Counts are int64 and sums float64, so a
merge is exact for counts and order-independent up to float64 addition. A block's own partial sums are
taken in float64 too, except the per-class probability totals of a sub-block, summed in the compute
dtype (float32 sums of <= 64K values, accurate far below float32's per-voxel error; float64 logits give
float64 throughout).

Metric definitions (theory.md §6, docs/metrics.md): top-label reliability bins -> ece, mce, ace;
classwise_ece; adaptive_ece (equal-mass bins); nll; brier; accuracy; confusion matrix -> dice, iou,
dice_mean, iou_mean (a class absent from both prediction and label is left out); ba_ece with distances.

A state can be made for a subset of METRIC_NAMES (`metrics=`): NLL, Brier, classwise and adaptive ECE each
cost per-voxel work and are only accumulated when asked for; `compute` returns exactly the metrics asked
for (plus `adaptive_ece_bound` with `adaptive_ece`, `ba_ece` with boundary). The reliability bins and the
confusion matrix are always kept (the reliability diagram and decision preservation need them; both cost
one histogram per sub-block).

`add` takes eager per-voxel statistics (voxels.py); the fused numba kernel (fused.py) instead adds the
histograms into this state's tensors in place and its totals through `add_sums`, leaving only the
classwise-ECE and BA-ECE sums to `add_extras`.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from segcal_cli.metrics import adaptive
from segcal_cli.metrics.boundary import BAND_EDGES, NUM_BANDS, ba_ece
from segcal_cli.metrics.binning import Binner, bin_bounds
from segcal_cli.metrics.voxels import VoxelStats, valid_parts, voxel_stats

METRIC_NAMES = ("ece", "mce", "ace", "adaptive_ece", "classwise_ece", "nll", "brier", "accuracy", "dice_mean",
                "iou_mean", "dice", "iou")
BOUNDARY_METRICS = ("ba_ece",)


def select_metrics(metrics) -> tuple[str, ...]:
    """The metrics asked for, in METRIC_NAMES order (None = all); ValueError on an unknown name."""
    if metrics is None:
        return METRIC_NAMES
    unknown = [m for m in metrics if m not in METRIC_NAMES]
    if unknown:
        raise ValueError(f"unknown metric(s): {', '.join(unknown)}")
    return tuple(m for m in METRIC_NAMES if m in set(metrics))


def _bincount(index: torch.Tensor, size: int, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Counts (int64), or weighted sums taken in float64 (weights here are per voxel, not per class)."""
    if weights is None:
        return torch.bincount(index, minlength=size)
    return torch.bincount(index, weights=weights.double(), minlength=size)


class MetricState:
    """Sums for one population of voxels (one case, or all cases pooled)."""

    def __init__(self, num_classes: int, bins: int = 15, bin_rule: str = "right", *, boundary: bool = False,
                 device="cpu", metrics=None):
        self.num_classes = num_classes
        self.metrics = select_metrics(metrics)
        self.wants_nll = "nll" in self.metrics
        self.wants_brier = "brier" in self.metrics
        self.wants_classwise = "classwise_ece" in self.metrics
        self.wants_adaptive = "adaptive_ece" in self.metrics
        self.binner = Binner(bins, bin_rule)
        self.bins = bins
        self.bin_rule = bin_rule
        self.boundary = boundary
        nb = self.binner.num_bins
        C = num_classes
        i64 = dict(dtype=torch.int64, device=device)
        f64 = dict(dtype=torch.float64, device=device)
        self.voxels = torch.zeros((), **i64)
        self.nll_sum = torch.zeros((), **f64)
        self.brier_sum = torch.zeros((), **f64)
        # top-label reliability bins: [count, correct] interleaved as 2*bin + correct, and confidence sums
        self.bin_count = torch.zeros(2 * nb, **i64)
        self.bin_conf = torch.zeros(nb, **f64)
        # classwise bins of p_k, flattened (class, bin): count, label hits, probability sums
        self.cw_count = torch.zeros(C * nb, **i64)
        self.cw_hits = torch.zeros(C * nb, **i64)
        self.cw_prob = torch.zeros(C * nb, **f64)
        self.label_count = torch.zeros(C, **i64)
        self.confusion = torch.zeros(C * C, **i64)  # row = label, column = prediction
        F = adaptive.NUM_BUCKETS
        self.fine_count = torch.zeros(2 * F, **i64)
        self.fine_conf = torch.zeros(F, **f64)
        self.fine_min = torch.full((F,), math.inf, **f64)
        self.fine_max = torch.full((F,), -math.inf, **f64)
        if boundary:
            self.band_count = torch.zeros(2 * NUM_BANDS, **i64)
            self.band_conf = torch.zeros(NUM_BANDS, **f64)
            self.band_dist = torch.zeros(NUM_BANDS, **f64)
            self._band_edges = torch.tensor(BAND_EDGES, **f64)

    # -- accumulate ------------------------------------------------------------------------------------
    _SUMMED = ("voxels", "nll_sum", "brier_sum", "bin_count", "bin_conf", "cw_count", "cw_hits", "cw_prob",
               "label_count", "confusion", "fine_count", "fine_conf")
    _BOUNDARY_SUMMED = ("band_count", "band_conf", "band_dist")

    def needs(self) -> dict:
        """Which optional per-voxel statistics `add` uses (keyword arguments of voxels.voxel_stats)."""
        return {"nll": self.wants_nll, "brier": self.wants_brier, "probs": self.wants_classwise}

    def update(self, logits: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor | None = None,
               distances: torch.Tensor | None = None) -> None:
        """Add a block: `logits` (C, n) float, `labels` (n,) int64, `valid` (n,) bool or None (all valid),
        `distances` (n,) to the label boundary (needed when the state was made with boundary=True)."""
        if self.boundary and distances is None:
            raise ValueError("this state measures BA-ECE: pass distances")
        for part, keep, y, d in valid_parts(labels, valid, distances):
            self.add(voxel_stats(logits[:, part], labels[part], **self.needs()).select(keep), y, d)

    def add(self, stats: VoxelStats, labels: torch.Tensor, distances: torch.Tensor | None = None) -> None:
        """Add statistics of s valid voxels (see voxels.voxel_stats)."""
        C = self.num_classes
        nb = self.binner.num_bins
        s = labels.shape[0]
        if s == 0:
            return
        conf = stats.conf
        conf64 = conf if conf.dtype == torch.float64 else conf.double()  # weights of the float64 sums
        correct = stats.correct.long()
        self.voxels += s
        if self.wants_nll:
            self.nll_sum += stats.nll.sum(dtype=torch.float64)
        if self.wants_brier:
            self.brier_sum += stats.brier.sum(dtype=torch.float64)

        idx = stats.bin_index if stats.bin_index is not None else self.binner.index(conf)
        self.bin_count += torch.bincount(idx * 2 + correct, minlength=2 * nb)
        self.bin_conf += torch.bincount(idx, weights=conf64, minlength=nb)
        self.confusion += torch.bincount(labels * C + stats.pred, minlength=C * C)
        if self.wants_adaptive:
            fine = stats.fine_bucket if stats.fine_bucket is not None else adaptive.fine_bucket(conf)
            F = adaptive.NUM_BUCKETS
            self.fine_count += torch.bincount(fine * 2 + correct, minlength=2 * F)
            self.fine_conf += torch.bincount(fine, weights=conf64, minlength=F)
            self.fine_min.scatter_reduce_(0, fine, conf64, reduce="amin")
            self.fine_max.scatter_reduce_(0, fine, conf64, reduce="amax")
        self.add_extras(stats, labels, distances)

    @property
    def has_extras(self) -> bool:
        """Whether the state holds sums the fused kernel does not compute (classwise ECE, BA-ECE)."""
        return self.wants_classwise or self.boundary

    def extras_needs(self) -> dict:
        """The voxels.voxel_stats arguments `add_extras` needs."""
        return {"nll": False, "brier": False, "probs": self.wants_classwise}

    def add_extras(self, stats: VoxelStats, labels: torch.Tensor, distances: torch.Tensor | None = None) -> None:
        """The classwise-ECE and BA-ECE sums of s valid voxels: the part of `add` that the fused kernel
        (fused.py), which adds everything else, leaves to the eager statistics."""
        C = self.num_classes
        if labels.shape[0] == 0:
            return
        if self.wants_classwise:
            label_count = torch.bincount(labels, minlength=C)
            self.label_count += label_count
            self._add_classwise(stats.probs, labels, label_count)

        if self.boundary:
            if distances is None:
                raise ValueError("this state measures BA-ECE: pass distances")
            conf = stats.conf
            correct = stats.correct.long()
            dist = distances.double()
            band_conf, band_correct = conf, correct
            finite = torch.isfinite(dist)
            if not bool(finite.all()):  # a case without any label boundary takes no part in BA-ECE
                dist, band_conf, band_correct = dist[finite], conf[finite], correct[finite]
            band = torch.bucketize(dist, self._band_edges.to(dist.device), right=True)
            self.band_count += _bincount(2 * band + band_correct, 2 * NUM_BANDS)
            self.band_conf += _bincount(band, NUM_BANDS, band_conf)
            self.band_dist += _bincount(band, NUM_BANDS, dist)

    def add_sums(self, voxels: int, nll_sum: float, brier_sum: float) -> None:
        """The totals of valid voxels whose histograms (reliability bins, confusion matrix, adaptive buckets)
        the fused kernel (fused.py) has already added to this state's tensors in place."""
        self.voxels += voxels
        if self.wants_nll:
            self.nll_sum += nll_sum
        if self.wants_brier:
            self.brier_sum += brier_sum

    def _add_classwise(self, probs: torch.Tensor, labels: torch.Tensor, label_count: torch.Tensor) -> None:
        """Bins of every p_k. Most p_k fall in bin 0, so only the entries above it are binned one by one;
        bin 0 is the per-class total minus the rest."""
        C = self.num_classes
        nb = self.binner.num_bins
        s = labels.shape[0]
        above = self.binner.first_edge_exceeded(probs).view(-1).nonzero().squeeze(1)
        values = probs.reshape(-1).index_select(0, above)
        cls = torch.div(above, s, rounding_mode="floor")
        voxel = above - cls * s
        key = cls * nb + self.binner.index(values)
        hit = labels.index_select(0, voxel) == cls
        count_above = _bincount(key, C * nb)
        hits_above = _bincount(key[hit], C * nb)
        prob_above = _bincount(key, C * nb, values)
        # bin 0 of class k: every voxel, minus those above; hits of k = voxels labelled k
        first = torch.arange(C, device=labels.device) * nb
        totals_count = torch.zeros(C * nb, dtype=torch.int64, device=labels.device)
        totals_hits = torch.zeros_like(totals_count)
        totals_prob = torch.zeros(C * nb, dtype=torch.float64, device=labels.device)
        totals_count[first] = s
        totals_hits[first] = label_count
        totals_prob[first] = probs.double().sum(1)  # float64 per voxel: sums independent of the sub-blocks
        self.cw_count += count_above + totals_count - _sum_into_first(count_above, C, nb)
        self.cw_hits += hits_above + totals_hits - _sum_into_first(hits_above, C, nb)
        self.cw_prob += prob_above + totals_prob - _sum_into_first(prob_above, C, nb)

    def merge(self, other: "MetricState") -> "MetricState":
        """Add another state's sums into this one (same classes, bins, rule); returns self."""
        if (other.num_classes, other.bins, other.bin_rule, other.boundary, other.metrics) != (
                self.num_classes, self.bins, self.bin_rule, self.boundary, self.metrics):
            raise ValueError("cannot merge metric states of different classes, bins, bin rule, boundary or metrics")
        names = self._SUMMED + (self._BOUNDARY_SUMMED if self.boundary else ())
        for name in names:
            mine = getattr(self, name)
            mine += getattr(other, name).to(mine.device)
        torch.minimum(self.fine_min, other.fine_min.to(self.fine_min.device), out=self.fine_min)
        torch.maximum(self.fine_max, other.fine_max.to(self.fine_max.device), out=self.fine_max)
        return self

    def to(self, device) -> "MetricState":
        for name in self._SUMMED + ("fine_min", "fine_max") + (self._BOUNDARY_SUMMED if self.boundary else ()):
            setattr(self, name, getattr(self, name).to(device))
        return self

    # -- results ---------------------------------------------------------------------------------------
    def reliability(self) -> list[dict]:
        """Per-bin count, mean confidence and accuracy (None for empty bins)."""
        counts = self.bin_count.cpu().view(-1, 2).numpy()
        conf = self.bin_conf.cpu().numpy()
        rows = []
        for (lo, hi), (wrong, right), csum in zip(bin_bounds(self.bins, self.bin_rule), counts, conf):
            n = int(wrong + right)
            rows.append({"lo": lo, "hi": hi, "count": n,
                         "confidence": float(csum / n) if n else None,
                         "accuracy": float(right / n) if n else None})
        return rows

    def compute(self) -> dict:
        """The metrics asked for as floats (NaN when undefined), per-class `dice` / `iou` as lists (None where
        undefined), `adaptive_ece_bound` with `adaptive_ece`, `ba_ece` with boundary."""
        everything = self._compute_all()
        keep = set(self.metrics) | ({"adaptive_ece_bound"} if self.wants_adaptive else set()) | (
            set(BOUNDARY_METRICS) if self.boundary else set())
        return {name: value for name, value in everything.items() if name in keep}

    def dice_summary(self) -> tuple[list, float]:
        """Per-class Dice (None where undefined) and its mean over defined classes, whatever was asked for
        (decision preservation reports the Dice change)."""
        dice, _ = dice_iou(self.confusion.cpu().view(self.num_classes, self.num_classes).numpy())
        return _list(dice), _nanmean(dice)

    def _compute_all(self) -> dict:
        C = self.num_classes
        nb = self.binner.num_bins
        n = int(self.voxels.item())
        out: dict = {}
        counts = self.bin_count.cpu().view(nb, 2).numpy().astype(np.float64)
        bin_n = counts.sum(1)
        bin_acc_sum = counts[:, 1]
        bin_conf_sum = self.bin_conf.cpu().numpy()
        nonempty = bin_n > 0
        if n:
            gap = np.abs(bin_acc_sum[nonempty] - bin_conf_sum[nonempty]) / bin_n[nonempty]
            out["ece"] = float(np.abs(bin_acc_sum - bin_conf_sum).sum() / n)
            out["mce"] = float(gap.max())
            out["ace"] = float(gap.mean())
            cw_n = self.cw_count.cpu().view(C, nb).numpy().astype(np.float64)
            cw_gap = np.abs(self.cw_hits.cpu().view(C, nb).numpy() - self.cw_prob.cpu().view(C, nb).numpy())
            out["classwise_ece"] = float((cw_gap.sum(1) / n).mean()) if cw_n.sum() else float("nan")
            out["nll"] = float(self.nll_sum.item() / n)
            out["brier"] = float(self.brier_sum.item() / n)
            out["accuracy"] = float(bin_acc_sum.sum() / n)
        else:
            for name in ("ece", "mce", "ace", "classwise_ece", "nll", "brier", "accuracy"):
                out[name] = float("nan")
        if self.wants_adaptive:
            fine = self.fine_count.cpu().view(-1, 2).numpy()
            ad, bound = adaptive.adaptive_ece(fine.sum(1), fine[:, 1], self.fine_conf.cpu().numpy(),
                                              self.fine_min.cpu().numpy(), self.fine_max.cpu().numpy(), self.bins)
            out["adaptive_ece"] = ad
            out["adaptive_ece_bound"] = bound
        dice, iou = dice_iou(self.confusion.cpu().view(C, C).numpy())
        out["dice_mean"] = _nanmean(dice)
        out["iou_mean"] = _nanmean(iou)
        out["dice"] = _list(dice)
        out["iou"] = _list(iou)
        if self.boundary:
            bands = self.band_count.cpu().view(-1, 2).numpy()
            out["ba_ece"] = ba_ece(bands.sum(1), bands[:, 1].astype(np.float64),
                                            self.band_conf.cpu().numpy(), self.band_dist.cpu().numpy())
        return out


def _sum_into_first(per_bin: torch.Tensor, C: int, nb: int) -> torch.Tensor:
    """A (C*nb) tensor holding, at each class's bin 0, the sum over that class's bins."""
    out = torch.zeros_like(per_bin)
    out[torch.arange(C, device=per_bin.device) * nb] = per_bin.view(C, nb).sum(1)
    return out


def dice_iou(confusion: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-class Dice 2TP/(2TP+FP+FN) and IoU TP/(TP+FP+FN); NaN for a class absent from both."""
    confusion = confusion.astype(np.float64)
    tp = np.diag(confusion)
    fp = confusion.sum(0) - tp
    fn = confusion.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        dice = np.where(tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), np.nan)
        iou = np.where(tp + fp + fn > 0, tp / (tp + fp + fn), np.nan)
    return dice, iou


def _nanmean(values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else float("nan")


def _list(values: np.ndarray) -> list:
    return [float(v) if np.isfinite(v) else None for v in values]
