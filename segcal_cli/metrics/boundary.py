"""Boundary-aware calibration error (BA-ECE, theory.md §6).

Voxels are banded by their Euclidean distance (in voxels; anisotropic spacing is not applied) to the nearest
ground-truth label boundary, with band edges (0, 3, 7, 15, inf): [0, 3), [3, 7), [7, 15), [15, inf). A
boundary voxel is one with a face neighbour of a different label value (the ignore label counts as a label
value, so the edge of an ignored region is a boundary); its distance is 0. Per band the gap is
|mean(1 - conf) - error rate| = |accuracy - mean confidence|, and bands are weighted by
1 / (mean distance in the band + 1), normalised over non-empty bands. A case whose labels hold a single value
has no boundary: its voxels are infinitely far, take no part in BA-ECE, and its own BA-ECE is undefined.

The distance transform needs a case's whole label volume (C times smaller than its logits); scipy is the
optional extra `boundary`.
"""

from __future__ import annotations

import numpy as np

BAND_EDGES = (3.0, 7.0, 15.0)
NUM_BANDS = len(BAND_EDGES) + 1


def require_scipy() -> None:
    from segcal_cli.errors import InputError

    try:
        import scipy.ndimage  # noqa: F401
    except ImportError:
        raise InputError("--boundary needs scipy: pip install 'segcal[boundary]'") from None


def boundary_distance(labels: np.ndarray) -> np.ndarray:
    """float32 distance of every voxel to the nearest label-boundary voxel (inf when there is none)."""
    from scipy import ndimage

    labels = np.asarray(labels)
    boundary = np.zeros(labels.shape, dtype=bool)
    for axis in range(labels.ndim):
        differs = np.diff(labels, axis=axis) != 0
        lower = [slice(None)] * labels.ndim
        upper = [slice(None)] * labels.ndim
        lower[axis] = slice(0, -1)
        upper[axis] = slice(1, None)
        boundary[tuple(lower)] |= differs
        boundary[tuple(upper)] |= differs
    if not boundary.any():
        return np.full(labels.shape, np.inf, dtype=np.float32)
    return ndimage.distance_transform_edt(~boundary).astype(np.float32)


def ba_ece(count: np.ndarray, correct: np.ndarray, conf_sum: np.ndarray, dist_sum: np.ndarray) -> float:
    """BA-ECE from per-band sums; NaN when every band is empty."""
    nonempty = count > 0
    if not nonempty.any():
        return float("nan")
    n = count[nonempty].astype(np.float64)
    gap = np.abs(correct[nonempty] / n - conf_sum[nonempty] / n)
    weight = 1.0 / (dist_sum[nonempty] / n + 1.0)
    return float((weight * gap).sum() / weight.sum())
