"""The per-voxel statistics of `voxels.voxel_stats` as one compiled kernel (torch.compile / Inductor).

Eager torch makes one pass over the (C, s) logits per operation (amax, compare, subtract, exp, sums) and
one more per voxel-sized step (binning, bucket keys); Inductor fuses them into a loop that reads the logits
twice (amax, then exp and sums) and writes only per-voxel results: ~4x the eager speed here (see
docs/metrics.md). The maths is the eager code's: same class order in the sums, same binning against the
same float32 edges, same bucket keys; results agree with the eager path to float32 rounding (tested).

Shapes are fixed: every call gets a contiguous (C, SUB_BLOCK_VOXELS) sub-block, the tail of a block padded
with zeros, so one compile serves the whole run (no recompiles as block sizes vary). Compiling costs
~15-20 s the first time on this project's machines (less from Inductor's on-disk cache), so it is used by
default only for large data; SEGCAL_COMPILE=0 / `--no-compile` turn it off, SEGCAL_COMPILE=1 / `--compile`
force it. Any failure to compile (no C++ compiler, an unsupported device) falls back to the eager path.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from segcal_cli.metrics import adaptive
from segcal_cli.metrics.binning import Binner, bin_index
from segcal_cli.metrics.voxels import SUB_BLOCK_VOXELS, VoxelStats

ENV_VAR = "SEGCAL_COMPILE"
# Measured end to end on the 2 GB benchmark file (docs/metrics.md): the kernel alone runs at ~1.3x the eager
# statistics, the whole evaluation at ~1.15x, against ~15-20 s of compiling with a cold Inductor cache (~4 s
# warm). That repays itself only on very large data, so "auto" compiles from ~4x that file's size on.
AUTO_MIN_VOXEL_CLASSES = 4_000_000_000


def compile_wanted(flag: Optional[bool], voxel_classes: int) -> bool:
    """`--compile/--no-compile` (flag), else SEGCAL_COMPILE=0/1, else by the amount of work."""
    from segcal_cli import kernel_choice

    if flag is not None:
        return flag
    return kernel_choice.wanted(voxel_classes, ENV_VAR, AUTO_MIN_VOXEL_CLASSES)


def _kernel(binner: Binner, num_classes: int, nll: bool, brier: bool, probs: bool, fine: bool) -> Callable:
    """The fused statistics as a plain function of (logits (C, S), labels (S,), edge table)."""
    B = binner.bins
    rule = binner.rule
    C = num_classes

    def stats(z: torch.Tensor, y: torch.Tensor, table: torch.Tensor):
        top = z.amax(0)
        rev = torch.arange(C - 1, -1, -1, device=z.device, dtype=torch.int32).unsqueeze(1)
        pred = (C - 1) - torch.where(z == top, rev, 0).amax(0).long()  # lowest class on ties
        e = torch.exp(z - top)
        total = e.sum(0)
        conf = total.reciprocal()
        correct = pred == y
        out = [conf, pred, correct]
        label_row = y.unsqueeze(0)
        if nll:
            out.append(total.log() + top - z.gather(0, label_row).squeeze(0))
        if brier:
            e_label = e.gather(0, label_row).squeeze(0)
            out.append(((e * e).sum(0) * conf - 2.0 * e_label) * conf + 1.0)
        if probs:
            out.append(e * conf)
        out.append(bin_index(conf, table, B, rule))  # the reliability bin, as binning.Binner.index
        if fine:
            out.append(adaptive.fine_bucket(conf))
        return tuple(out)

    return stats


_KERNELS: dict = {}


def _compiled_kernel(bins: int, rule: str, num_classes: int, *wants: bool) -> Callable:
    """One compiled kernel per configuration and process: a later run in the same process (tests, the
    benchmark) reuses it instead of tracing again."""
    key = (bins, rule, num_classes) + wants
    fn = _KERNELS.get(key)
    if fn is None:
        fn = torch.compile(_kernel(Binner(bins, rule), num_classes, *wants), dynamic=False, fullgraph=True)
        _KERNELS[key] = fn
    return fn


class CompiledStats:
    """Callable (logits (C, s) float32, labels (s,) int64) -> VoxelStats, or None once compiling failed
    (the caller then uses the eager path). One instance per run and metric selection."""

    def __init__(self, binner: Binner, num_classes: int, *, nll: bool, brier: bool, probs: bool, fine: bool):
        self.binner = binner
        self.num_classes = num_classes
        self.wants = (nll, brier, probs, fine)
        self._fn = _compiled_kernel(binner.bins, binner.rule, num_classes, nll, brier, probs, fine)
        self.failed: Optional[str] = None
        self._buffers: dict = {}

    def _padded(self, z: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = y.shape[0]
        if s == SUB_BLOCK_VOXELS:
            return z.contiguous(), y.contiguous()
        key = (z.dtype, z.device)
        bufs = self._buffers.get(key)
        if bufs is None:
            bufs = (torch.zeros((self.num_classes, SUB_BLOCK_VOXELS), dtype=z.dtype, device=z.device),
                    torch.zeros(SUB_BLOCK_VOXELS, dtype=torch.int64, device=z.device))
            self._buffers[key] = bufs
        zb, yb = bufs
        zb[:, :s].copy_(z)
        zb[:, s:].zero_()
        yb[:s].copy_(y)
        yb[s:].zero_()
        return zb, yb

    def __call__(self, z: torch.Tensor, y: torch.Tensor) -> Optional[VoxelStats]:
        if self.failed is not None or z.dtype != torch.float32:
            return None
        s = y.shape[0]
        zp, yp = self._padded(z, y)
        try:
            out = self._fn(zp, yp, self.binner.edge_table(zp))
        except Exception as err:  # any compile or run failure: the eager path takes over
            self.failed = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:300]
            return None
        out = [t[..., :s] if s < SUB_BLOCK_VOXELS else t for t in out]
        nll, brier, probs, fine = self.wants
        it = iter(out)
        stats = VoxelStats(conf=next(it), pred=next(it), correct=next(it))
        stats.nll = next(it) if nll else None
        stats.brier = next(it) if brier else None
        stats.probs = next(it) if probs else None
        stats.bin_index = next(it)
        stats.fine_bucket = next(it) if fine else None
        return stats
