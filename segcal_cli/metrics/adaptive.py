"""Equal-mass-bin ECE (`adaptive_ece`) from one streamed pass, with a stated error bound.

Exact equal-mass bins need every confidence sorted: memory proportional to the data. Instead each voxel goes
to a fine bucket of its confidence c, keyed by the float32 bits of u = min(c, 1 - c) (1 - c is exact in
float32 for c >= 1/2): 2^-MANTISSA_BITS relative resolution in c below 1/2 and in 1 - c above it, so the
crowded region just below 1.0 stays resolved; c = 1.0 exactly has a bucket of its own. Per bucket the state
holds the count, correct count, confidence sum and the confidence min / max (all mergeable).

Definition computed: sort valid voxels by confidence and cut them into B bins of exactly N/B voxels; voxels
with equal confidence are tied and a tie straddling a cut is split proportionally. The streamed value places
each cut inside its fine bucket by linear interpolation of the cumulative sums (that is, it treats the
bucket's voxels as tied). The difference from the definition is at most
    (2/N) * sum over cuts inside a bucket f whose min < max of
             [ min(q, n_f - q, A_f, n_f - A_f) + min(q, n_f - q) * (max_f - min_f) ],
with n_f voxels, A_f correct, q of them below the cut; it is reported as `adaptive_ece_bound`.
"""

from __future__ import annotations

import numpy as np
import torch

MANTISSA_BITS = 8
_SHIFT = 23 - MANTISSA_BITS
_FLOOR = float(2.0**-25)  # u below this shares bucket 0 (float32 c < 1 has 1 - c >= 2^-24)


def _bits(x: float) -> int:
    return int(np.array([x], dtype=np.float32).view(np.int32)[0])


_BASE = _bits(_FLOOR) >> _SHIFT
SHIFT, BASE, FLOOR = _SHIFT, _BASE, _FLOOR  # for the numba copy of fine_bucket (fused.py)
HALF_BUCKETS = (_bits(0.5) >> _SHIFT) - _BASE + 1
NUM_BUCKETS = 2 * HALF_BUCKETS


def fine_bucket(conf: torch.Tensor) -> torch.Tensor:
    """int64 bucket index, monotone non-decreasing in the confidence."""
    c = conf.float()
    high = c >= 0.5
    u = torch.where(high, 1.0 - c, c).clamp_(min=_FLOOR)
    mag = (u.view(torch.int32) >> _SHIFT).long().sub_(_BASE)
    return torch.where(high, (NUM_BUCKETS - 1) - mag, mag)


def adaptive_ece(count: np.ndarray, correct: np.ndarray, conf_sum: np.ndarray, conf_min: np.ndarray,
                 conf_max: np.ndarray, bins: int) -> tuple[float, float]:
    """(adaptive ECE, error bound) from the fine-bucket sums; NaN when there is no voxel."""
    keep = count > 0
    n_f = count[keep].astype(np.float64)
    hits = correct[keep].astype(np.float64)
    csum = conf_sum[keep]
    width = conf_max[keep] - conf_min[keep]
    total = float(n_f.sum())
    if total == 0:
        return float("nan"), float("nan")
    cum_n = np.concatenate([[0.0], np.cumsum(n_f)])
    cum_a = np.concatenate([[0.0], np.cumsum(hits)])
    cum_c = np.concatenate([[0.0], np.cumsum(csum)])
    cuts = total * np.arange(bins + 1, dtype=np.float64) / bins
    cuts[-1] = total
    at_a = np.interp(cuts, cum_n, cum_a)
    at_c = np.interp(cuts, cum_n, cum_c)
    ece = float(np.abs(np.diff(at_a) - np.diff(at_c)).sum() / total)

    bound = 0.0
    for cut in cuts[1:-1]:
        f = int(np.searchsorted(cum_n, cut, side="left")) - 1  # bucket whose range holds the cut
        if f < 0 or f >= len(n_f):
            continue
        q = cut - cum_n[f]
        if q <= 0 or q >= n_f[f] or width[f] <= 0:
            continue  # the cut falls between buckets, or inside a set of exactly tied voxels
        split = min(q, n_f[f] - q)
        bound += min(split, hits[f], n_f[f] - hits[f]) + split * width[f]
    return ece, float(2.0 * bound / total)
