"""Reproducible voxel sampling (theory.md §5 "Data").

Every voxel gets a key in [0, 1) from a hash of (seed, case index, the voxel's flat C-order index within
its case). The sample of size k is the k valid voxels with the smallest keys ("bottom-k"), gathered in one
streaming pass with a buffer of at most 2k voxels. The result depends on the seed and the data only: not
on `--chunk-voxels`, block order or device. Within a case the keys of distinct voxels never collide (the
32-bit mixer is a bijection); the sample is returned sorted by key so even float summation order is fixed.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

M32 = 0xFFFFFFFF
SCHEME = "bottom-k of a per-voxel hash key (murmur3 fmix32 of seed, case index, flat voxel index); uniform, unweighted"


def _mul32(h: torch.Tensor, c: int) -> torch.Tensor:
    """(h * c) mod 2^32 for h < 2^32 without int64 overflow (16-bit halves of c)."""
    return (h * (c & 0xFFFF) + (((h * (c >> 16)) & 0xFFFF) << 16)) & M32


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def _fmix32_int(value: int) -> int:
    return int(_fmix32(torch.tensor([value & M32], dtype=torch.int64))[0])


def case_salts(seed: int, case_index: int) -> Tuple[int, int]:
    base = _fmix32_int(_fmix32_int((seed & M32) ^ 0x243F6A88) ^ ((seed >> 32) & M32) ^ 0x85A308D3)
    first = _fmix32_int(base ^ (case_index & M32))
    return first, _fmix32_int(first ^ 0x13198A2E)


def voxel_keys(seed: int, case_index: int, flat_index: torch.Tensor) -> torch.Tensor:
    """float64 keys in [0, 1) with 53 random bits, one per flat voxel index (int64 tensor)."""
    salt_a, salt_b = case_salts(seed, case_index)
    low = flat_index & M32
    high = flat_index >> 32
    h1 = _fmix32((_fmix32(low ^ salt_a) + high) & M32)
    h2 = _fmix32(h1 ^ salt_b)
    return (h1 * (1 << 21) + (h2 >> 11)).to(torch.float64) / float(1 << 53)


def region_flat_index(region: Sequence[slice], spatial_shape: Sequence[int], device=None) -> torch.Tensor:
    """Flat C-order indices within the case of the voxels of a block region, in the block's own order."""
    strides, stride = [], 1
    for size in reversed(spatial_shape):
        strides.append(stride)
        stride *= int(size)
    strides.reverse()
    flat = torch.zeros(1, dtype=torch.int64, device=device)
    for axis, (sl, step) in enumerate(zip(region, strides)):
        start = sl.start or 0
        stop = sl.stop if sl.stop is not None else spatial_shape[axis]
        idx = torch.arange(start, stop, dtype=torch.int64, device=device) * step
        flat = (flat[:, None] + idx[None, :]).reshape(-1)
    return flat


def keyed_valid_voxels(dataset, blocks, seed: int, on_voxels=None):
    """(case index, logits (C, v), labels (v,) or None, keys (v,)) of the valid voxels of each block that has
    any, each voxel keyed by (seed, case index, flat position in its case) for a BottomKSampler.
    `on_voxels(n)` is told every block's voxel count, valid or not."""
    for block in blocks:
        if on_voxels is not None:
            on_voxels(block.num_voxels)
        valid = block.valid
        if not bool(valid.any()):
            continue
        case = dataset.cases[block.case_index]
        flat = region_flat_index(block.region, case.spatial_shape, device=block.logits.device)
        keys = voxel_keys(seed, block.case_index, flat)[valid]
        labels = block.labels[valid] if block.labels is not None else None
        yield block.case_index, block.logits[:, valid], labels, keys


class BottomKSampler:
    """Keeps the k smallest-key voxels seen so far; memory bounded by about 2k voxels (and the copies of a
    prune). `store_dtype`: keep the logits in this dtype (float16 when they came from float16 storage, which
    loses nothing and halves the buffer); `result` returns float32 either way."""

    def __init__(self, k: int, store_dtype: Optional[torch.dtype] = None):
        self.k = int(k)
        self.store_dtype = store_dtype
        self.threshold = 2.0  # keys are < 1: keep everything until the buffer first overflows
        self._logits: List[torch.Tensor] = []
        self._labels: List[torch.Tensor] = []
        self._keys: List[torch.Tensor] = []
        self._count = 0
        self.seen = 0

    def add(self, logits: torch.Tensor, labels: torch.Tensor, keys: torch.Tensor) -> None:
        self.seen += int(keys.numel())
        keep = keys < self.threshold
        if not bool(keep.all()):
            logits, labels, keys = logits[:, keep], labels[keep], keys[keep]
        if keys.numel() == 0:
            return
        if self.store_dtype is not None and logits.dtype != self.store_dtype:
            logits = logits.to(self.store_dtype)
        self._logits.append(logits)
        self._labels.append(labels)
        self._keys.append(keys)
        self._count += int(keys.numel())
        if self._count > 2 * self.k:
            self._prune()

    def _concat(self):
        if not self._keys:
            return None
        if len(self._keys) > 1:
            self._logits = [torch.cat(self._logits, dim=1)]
            self._labels = [torch.cat(self._labels)]
            self._keys = [torch.cat(self._keys)]
        return self._logits[0], self._labels[0], self._keys[0]

    def _prune(self) -> None:
        logits, labels, keys = self._concat()
        if keys.numel() <= self.k:
            return
        order = torch.sort(keys).indices[: self.k]
        self.threshold = float(keys[order[-1]])
        self._logits = [logits[:, order]]
        self._labels = [labels[order]]
        self._keys = [keys[order]]
        self._count = self.k

    def result(self, num_classes: int, device=None) -> Tuple[torch.Tensor, torch.Tensor, Optional[float]]:
        """(logits (C, m), labels (m,), key threshold or None when every valid voxel was kept), key order."""
        got = self._concat()
        if got is None:
            return (torch.empty(num_classes, 0, device=device), torch.empty(0, dtype=torch.int64, device=device), None)
        logits, labels, keys = got
        full = keys.numel() <= self.k and self.threshold > 1.0
        order = torch.sort(keys).indices[: self.k]
        threshold = None if full else float(keys[order[-1]])
        chosen = logits[:, order]
        chosen = chosen.float() if chosen.dtype == torch.float16 else chosen.contiguous()
        return chosen, labels[order], threshold
