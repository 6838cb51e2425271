"""Per-voxel statistics of one block of logits, fused and computed in the logits' dtype (eager torch).

Speed (engineering.md, measured again here): `x.max(0)` with indices and `argmax` are slow on CPU, so the
prediction comes from `amax` and an equality test; `exp` is the most expensive per-element step, so it runs
once per element; the Brier score needs no probability tensor (Σ p_k² = Σ e_k² / S²), so probabilities are
only formed when classwise ECE asks for them. A compiled version of the same statistics is in `compiled.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

# Voxels per sub-block: the (C, n) working set of a few such blocks stays in cache (engineering.md:
# 64K-256K voxel ops were 10-40% faster than one huge block).
SUB_BLOCK_VOXELS = 1 << 16


@dataclass
class VoxelStats:
    """Statistics of s valid voxels; every tensor is on the logits' device. Optional fields are None when
    the metrics asked for do not need them (or, for the indices, when `MetricState.add` should compute them)."""

    conf: torch.Tensor  # (s,) top-label confidence max_k p_k, compute dtype
    pred: torch.Tensor  # (s,) int64 argmax, ties -> lowest class index
    correct: torch.Tensor  # (s,) bool
    nll: Optional[torch.Tensor] = None  # (s,) -log p_y
    brier: Optional[torch.Tensor] = None  # (s,) sum_k (p_k - [y = k])^2
    probs: Optional[torch.Tensor] = None  # (C, s) softmax (classwise ECE only)
    bin_index: Optional[torch.Tensor] = None  # (s,) int64 reliability bin of conf
    fine_bucket: Optional[torch.Tensor] = None  # (s,) int64 adaptive-ECE bucket of conf

    def select(self, keep: Optional[torch.Tensor]) -> "VoxelStats":
        """The statistics of the voxels `keep` (int64 indices into s; None: all). Statistics are computed
        on every voxel of a sub-block and cut to the valid ones afterwards: cutting (C, s) logits first
        costs a gather of C values per voxel (index_select along dim 1 is slow on CPU), cutting these
        costs one value per statistic."""
        if keep is None:
            return self
        return VoxelStats(**{name: None if value is None else value.index_select(value.dim() - 1, keep)
                             for name, value in self.__dict__.items()})


def _reverse_index(num_classes: int, device) -> torch.Tensor:
    dtype = torch.uint8 if num_classes <= 256 else torch.int32
    return torch.arange(num_classes - 1, -1, -1, dtype=dtype, device=device).unsqueeze(1)


_rev_cache: dict = {}


def predictions(logits: torch.Tensor, top: torch.Tensor | None = None) -> torch.Tensor:
    """argmax over classes (dim 0), lowest index on ties, without the slow CPU argmax kernel."""
    num_classes = logits.shape[0]
    if top is None:
        top = logits.amax(0)
    key = (num_classes, logits.device)
    rev = _rev_cache.get(key)
    if rev is None:
        rev = _rev_cache[key] = _reverse_index(num_classes, logits.device)
    # The lowest tied class has the highest reversed index.
    return (num_classes - 1) - ((logits == top) * rev).amax(0).long()


def _sum_classes(x: torch.Tensor, squared: bool = False) -> torch.Tensor:
    """Sum over classes in a fixed order (0, 1, ..., C-1). torch's reduction over dim 0 groups its additions
    differently for different block widths, which would make results depend on --chunk-voxels."""
    total = x[0] * x[0] if squared else x[0].clone()
    for k in range(1, x.shape[0]):
        if squared:
            total.addcmul_(x[k], x[k])
        else:
            total.add_(x[k])
    return total


def voxel_stats(logits: torch.Tensor, labels: torch.Tensor, *, nll: bool = True, brier: bool = True,
                probs: bool = True) -> VoxelStats:
    """Fused statistics of `logits` (C, s) float and `labels` (s,) int64 (all voxels valid); `nll`, `brier`,
    `probs` say which optional statistics to form."""
    top = logits.amax(0)
    pred = predictions(logits, top)
    e = torch.sub(logits, top).exp_()  # exp(z - max): the top class gives exactly 1
    total = _sum_classes(e)  # S >= 1
    conf = total.reciprocal()  # max_k p_k = 1 / S; exactly 1.0 when the other classes underflow
    label_row = labels.unsqueeze(0)
    stats = VoxelStats(conf=conf, pred=pred, correct=pred == labels)
    if nll:
        stats.nll = total.log().add_(top).sub_(logits.gather(0, label_row).squeeze(0))  # logsumexp(z) - z_y
    if brier:
        # sum_k p_k^2 - 2 p_y + 1 with p = e / S: (sum_k e_k^2 / S - 2 e_y) / S + 1
        e_label = e.gather(0, label_row).squeeze(0)
        stats.brier = _sum_classes(e, squared=True).mul_(conf).sub_(e_label, alpha=2.0).mul_(conf).add_(1.0)
    if probs:
        stats.probs = e.mul_(conf)
    return stats


def sub_blocks(num_voxels: int, size: int = SUB_BLOCK_VOXELS):
    """Slices covering range(num_voxels) in pieces of at most `size`."""
    for start in range(0, num_voxels, size):
        yield slice(start, min(start + size, num_voxels))


def valid_parts(labels, valid=None, distances=None, size: int = SUB_BLOCK_VOXELS):
    """Per sub-block of a block: (part, keep, labels kept, distances kept). `part` slices the block; `keep`
    indexes the valid voxels within it (None when the whole block is valid), as VoxelStats.select takes it."""
    all_valid = valid is None or bool(valid.all())
    for part in sub_blocks(labels.shape[0], size):
        keep = None if all_valid else valid[part].nonzero().squeeze(1)
        y = labels[part] if keep is None else labels[part].index_select(0, keep)
        d = None if distances is None else (distances[part] if keep is None else distances[part].index_select(0, keep))
        yield part, keep, y, d
