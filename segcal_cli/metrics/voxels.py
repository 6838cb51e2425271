"""Per-voxel statistics of one block of logits, fused and computed in the logits' dtype.

Speed (engineering.md): `x.max(0)` with indices and `argmax` are slow on CPU, so the prediction comes from
`amax` and an equality test; the softmax reuses one exp buffer; nothing here allocates per class twice.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Voxels per sub-block: the (C, n) working set of a few such blocks stays in cache (engineering.md:
# 64K-256K voxel ops were 10-40% faster than one huge block).
SUB_BLOCK_VOXELS = 1 << 16


@dataclass
class VoxelStats:
    """Statistics of s valid voxels; every tensor is on the logits' device."""

    probs: torch.Tensor  # (C, s) softmax, compute dtype
    conf: torch.Tensor  # (s,) top-label confidence max_k p_k
    pred: torch.Tensor  # (s,) int64 argmax, ties -> lowest class index
    correct: torch.Tensor  # (s,) bool
    nll: torch.Tensor  # (s,) -log p_y
    brier: torch.Tensor  # (s,) sum_k (p_k - [y = k])^2


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


def voxel_stats(logits: torch.Tensor, labels: torch.Tensor) -> VoxelStats:
    """Fused statistics of `logits` (C, s) float and `labels` (s,) int64 (all voxels valid)."""
    top = logits.amax(0)
    pred = predictions(logits, top)
    probs = torch.sub(logits, top).exp_()  # exp(z - max): the top class gives exactly 1
    total = _sum_classes(probs)  # >= 1
    conf = total.reciprocal()  # max_k p_k = 1 / sum_k exp(z_k - max); exactly 1.0 when the rest underflow
    label_row = labels.unsqueeze(0)
    nll = total.log().add_(top).sub_(logits.gather(0, label_row).squeeze(0))  # logsumexp(z) - z_y
    probs.mul_(conf)
    p_label = probs.gather(0, label_row).squeeze(0)
    brier = _sum_classes(probs, squared=True).sub_(p_label, alpha=2.0).add_(1.0)
    correct = pred == labels
    return VoxelStats(probs=probs, conf=conf, pred=pred, correct=correct, nll=nll, brier=brier)


def sub_blocks(num_voxels: int, size: int = SUB_BLOCK_VOXELS):
    """Slices covering range(num_voxels) in pieces of at most `size`."""
    for start in range(0, num_voxels, size):
        yield slice(start, min(start + size, num_voxels))
