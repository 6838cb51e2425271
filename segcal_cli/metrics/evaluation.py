"""Evaluation: per-case and pooled metric states over a stream of blocks, before and after a calibrator.

Blocks of one case may arrive in any order and interleaved with other cases; a case is finished (its
metrics computed, its state merged into the pooled one and dropped) once all its voxels were seen, so memory
stays bounded by the cases in flight. The calibrated metrics come from the same blocks as the uncalibrated
ones: one read of the data.

Float32 blocks in CPU memory go through the fused numba kernel (fused.py: per-voxel statistics and histograms
in one pass, ~6x the eager speed); only classwise ECE and BA-ECE, when asked for, still come from eager
per-voxel statistics beside it (`MetricState.add_extras`), so every other metric has the same value whatever
`--metrics` selects. With SEGCAL_FUSED=0, without numba, with --compile / SEGCAL_COMPILE=1, or for other
blocks (float64, on a GPU) the eager torch path (voxels.py, state.py) or the torch.compile kernel
(compiled.py) does all the work. The paths agree to float32 rounding.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from segcal_cli.metrics import fused
from segcal_cli.metrics.compiled import compile_wanted
from segcal_cli.metrics.preservation import PreservationState
from segcal_cli.metrics.state import MetricState, select_metrics
from segcal_cli.metrics.voxels import SUB_BLOCK_VOXELS, VoxelStats, valid_parts, voxel_stats

Calibrate = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class _CaseStates:
    uncalibrated: MetricState
    calibrated: Optional[MetricState]
    preservation: Optional[PreservationState]
    seen: int = 0


@dataclass
class EvaluationResult:
    bins: int
    bin_rule: str
    boundary: bool
    cases: int
    voxels: int  # valid voxels scored
    voxels_read: int
    uncalibrated: dict  # {"pooled": METRICS, "per_case_mean": METRICS}
    calibrated: Optional[dict]
    preservation: Optional[dict]
    reliability: dict  # {"uncalibrated": [...], "calibrated": [...]}
    per_case: list = field(default_factory=list)  # [{"id", "voxels", METRICS, ("uncalibrated", preservation)}]
    metrics: tuple = ()  # the metric names computed (--metrics)


class Evaluation:
    def __init__(self, num_classes: int, case_ids: Sequence[str], case_voxels: Sequence[int], *, bins: int = 15,
                 bin_rule: str = "right", boundary: bool = False, calibrate: Optional[Calibrate] = None,
                 device="cpu", sub_block_voxels: Optional[int] = None, metrics: Optional[Sequence[str]] = None,
                 compile: Optional[bool] = False):
        """`metrics`: the names to compute (None = all of state.METRIC_NAMES). `compile`: True / False, or
        None to decide from SEGCAL_COMPILE and the amount of data (compiled.compile_wanted)."""
        self.num_classes = num_classes
        self.metrics = select_metrics(metrics)
        self.case_ids = list(case_ids)
        self.case_voxels = list(case_voxels)
        self.bins = bins
        self.bin_rule = bin_rule
        self.boundary = boundary
        self.calibrate = calibrate
        self.device = device
        self.sub_block_voxels = sub_block_voxels
        self._open: dict[int, _CaseStates] = {}
        self._case_rows: dict[int, dict] = {}
        self.pooled_uncalibrated = self._state()
        self.pooled_calibrated = self._state() if calibrate else None
        self.pooled_preservation = PreservationState(device) if calibrate else None
        self.voxels_read = 0
        self._needs = self.pooled_uncalibrated.needs()
        self._fused = None
        self._fused_reason: Optional[str] = None
        self._compiled = None
        # --compile / SEGCAL_COMPILE=1 ask for the torch.compile kernel; otherwise the fused kernel serves
        # float32 CPU blocks where numba can run it and the data is large enough (fused.wanted)
        forced_compile = compile_wanted(compile, 0)
        voxel_classes = num_classes * sum(self.case_voxels)
        if not forced_compile and fused.supports_state(self.pooled_uncalibrated) and fused.wanted(voxel_classes):
            self._fused = fused.FusedAccumulator.create(self.pooled_uncalibrated)
            if self._fused is None:
                self._fused_reason = fused.unavailable_reason()
        self._extras = self.pooled_uncalibrated.has_extras
        if self._fused is None and sub_block_voxels is None:  # the compiled kernel has the standard sub-block shape
            if compile_wanted(compile, voxel_classes):
                from segcal_cli.metrics.compiled import CompiledStats  # imports torch._dynamo: only when used

                state = self.pooled_uncalibrated
                self._compiled = CompiledStats(state.binner, num_classes, fine=state.wants_adaptive, **self._needs)

    @property
    def compiled(self) -> bool:
        """Whether the compiled kernel is in use (asked for, and it has not failed)."""
        return self._compiled is not None and self._compiled.failed is None

    @property
    def fused(self) -> bool:
        """Whether CPU blocks go through the fused numba kernel (which also reads float16 logits as stored:
        a stream may keep them, `Dataset.stream(keep_float16=...)`)."""
        return self._fused is not None

    @property
    def fused_unavailable(self) -> Optional[str]:
        """Why the fused kernel is not used although it was wanted (None otherwise)."""
        return self._fused_reason

    @property
    def compile_error(self) -> Optional[str]:
        return None if self._compiled is None else self._compiled.failed

    def _state(self) -> MetricState:
        return MetricState(self.num_classes, self.bins, self.bin_rule, boundary=self.boundary, device=self.device,
                           metrics=self.metrics)

    def _stats(self, z: torch.Tensor, y: torch.Tensor) -> VoxelStats:
        if self._compiled is not None:
            stats = self._compiled(z, y)
            if stats is not None:
                return stats
        return voxel_stats(z, y, **self._needs)

    def _case(self, case_index: int) -> _CaseStates:
        states = self._open.get(case_index)
        if states is None:
            if case_index in self._case_rows:
                raise ValueError(f"case {self.case_ids[case_index]} was already finished")
            states = _CaseStates(self._state(), self._state() if self.calibrate else None,
                                 PreservationState(self.device) if self.calibrate else None)
            self._open[case_index] = states
        return states

    def add_block(self, case_index: int, logits: torch.Tensor, labels: torch.Tensor,
                  valid: Optional[torch.Tensor] = None, distances: Optional[torch.Tensor] = None) -> None:
        """One block of a case: logits (C, n), labels (n,) int64, valid (n,) bool, distances (n,)."""
        states = self._case(case_index)
        n = labels.shape[0]
        self.voxels_read += n
        if self._fused is not None and fused.accepts(logits):
            self._add_block_fused(states, logits, labels, valid, distances)
        else:  # float16 as stored (a stream with keep_float16) is scored in float32, like the kernel does
            if logits.dtype == torch.float16:
                logits = logits.float()
            self._add_block_eager(states, logits, labels, valid, distances)
        states.seen += n
        if states.seen >= self.case_voxels[case_index]:
            self._finish_case(case_index)

    def _add_block_eager(self, states: _CaseStates, logits, labels, valid, distances) -> None:
        size = self.sub_block_voxels or SUB_BLOCK_VOXELS
        for part, keep, y_kept, d in valid_parts(labels, valid, distances, size):
            z = logits[:, part]
            y = labels[part]
            before = self._stats(z, y)
            states.uncalibrated.add(before.select(keep), y_kept, d)
            if self.calibrate is not None:
                g = self.calibrate(z.contiguous())
                after = self._stats(g, y)
                states.calibrated.add(after.select(keep), y_kept, d)
                states.preservation.add(z, g, before.pred, after.pred, y, keep)

    def _add_block_fused(self, states: _CaseStates, logits, labels, valid, distances) -> None:
        """The whole block through the kernel in one call (it tiles the voxels itself and releases the GIL).
        Per sub-block then: the classwise / BA-ECE sums from eager statistics where asked for, and with a
        calibrator its logits through the kernel too, both predictions going to the decision-preservation
        counts."""
        kernel = self._fused
        n = labels.shape[0]
        before_pred = torch.empty(n, dtype=torch.int64) if self.calibrate is not None else None
        kernel.add(states.uncalibrated, logits, labels, valid, pred_out=before_pred)
        if self.calibrate is None and not self._extras:
            return
        size = self.sub_block_voxels or SUB_BLOCK_VOXELS
        extras = states.uncalibrated.extras_needs()
        for part, keep, y_kept, d in valid_parts(labels, valid, distances, size):
            z = logits[:, part]
            if z.dtype == torch.float16:  # the kernel read the stored float16; everything else gets float32
                z = z.float()
            y = labels[part]
            if self._extras:
                states.uncalibrated.add_extras(voxel_stats(z, y, **extras).select(keep), y_kept, d)
            if self.calibrate is None:
                continue
            g = self.calibrate(z.contiguous())
            if fused.accepts(g):
                after_pred = torch.empty(y.shape[0], dtype=torch.int64)
                kernel.add(states.calibrated, g, y, None if valid is None else valid[part], pred_out=after_pred)
                if self._extras:
                    states.calibrated.add_extras(voxel_stats(g, y, **extras).select(keep), y_kept, d)
            else:
                after = self._stats(g, y)
                states.calibrated.add(after.select(keep), y_kept, d)
                after_pred = after.pred
            states.preservation.add(z, g, before_pred[part], after_pred, y, keep)

    def _finish_case(self, case_index: int) -> None:
        states = self._open.pop(case_index)
        row: dict = {"id": self.case_ids[case_index], "voxels": int(states.uncalibrated.voxels.item())}
        before = states.uncalibrated.compute()
        if self.calibrate is not None:
            after = states.calibrated.compute()
            row.update(after)
            row["uncalibrated"] = before
            row["preservation"] = _preservation(states.preservation, states.uncalibrated, states.calibrated)
            self.pooled_calibrated.merge(states.calibrated)
            self.pooled_preservation.merge(states.preservation)
        else:
            row.update(before)
        self._case_rows[case_index] = row
        self.pooled_uncalibrated.merge(states.uncalibrated)

    def finish(self) -> EvaluationResult:
        """Finish any case still open (fewer voxels delivered than announced) and compute the results."""
        for case_index in sorted(self._open):
            self._finish_case(case_index)
        rows = [self._case_rows[i] for i in sorted(self._case_rows)]
        before = self.pooled_uncalibrated.compute()
        uncal_rows = [r["uncalibrated"] for r in rows] if self.calibrate else rows
        result = EvaluationResult(
            bins=self.bins, bin_rule=self.bin_rule, boundary=self.boundary, cases=len(rows),
            voxels=int(self.pooled_uncalibrated.voxels.item()), voxels_read=self.voxels_read,
            uncalibrated={"pooled": before, "per_case_mean": per_case_mean(uncal_rows)},
            calibrated=None, preservation=None,
            reliability={"uncalibrated": self.pooled_uncalibrated.reliability()}, per_case=rows,
            metrics=self.metrics)
        if self.calibrate is not None:
            after = self.pooled_calibrated.compute()
            result.calibrated = {"pooled": after, "per_case_mean": per_case_mean(rows)}
            result.preservation = _preservation(self.pooled_preservation, self.pooled_uncalibrated,
                                                self.pooled_calibrated)
            result.reliability["calibrated"] = self.pooled_calibrated.reliability()
        return result


def _preservation(counts: PreservationState, before: MetricState, after: MetricState) -> dict:
    (dice_before, mean_before), (dice_after, mean_after) = before.dice_summary(), after.dice_summary()
    return counts.compute(dice_before, dice_after, mean_before, mean_after)


def per_case_mean(rows: list[dict]) -> dict:
    """Mean over cases of every metric, skipping cases where it is undefined (NaN / None)."""
    if not rows:
        return {}
    out: dict = {}
    for name, value in rows[0].items():
        if name in ("id", "voxels", "uncalibrated", "preservation"):
            continue
        if isinstance(value, list):
            table = np.array([[np.nan if v is None else v for v in r[name]] for r in rows], dtype=np.float64)
            with np.errstate(invalid="ignore"):
                counts = np.isfinite(table).sum(0)
                sums = np.where(np.isfinite(table), table, 0.0).sum(0)
            out[name] = [float(s / c) if c else None for s, c in zip(sums, counts)]
        else:
            values = np.array([r[name] for r in rows], dtype=np.float64)
            finite = values[np.isfinite(values)]
            out[name] = float(finite.mean()) if finite.size else float("nan")
    return out


def _clean(value):
    """NaN / inf -> None, recursively, so the JSON is strict."""
    if isinstance(value, float):
        return value if np.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def result_payload(result: EvaluationResult, *, version: str, per_case: bool) -> dict:
    """The `--json` document (spec.md, "evaluate"); `checks` is added by the caller."""
    payload: dict = {
        "segcal_version": version,
        "bins": result.bins,
        "bin_rule": result.bin_rule,
        "cases": result.cases,
        "voxels": result.voxels,
        "voxels_read": result.voxels_read,
        "metrics": list(result.metrics),
        "uncalibrated": result.uncalibrated,
    }
    if result.calibrated is not None:
        payload["calibrated"] = result.calibrated
        payload["preservation"] = result.preservation
    payload["reliability"] = result.reliability
    if per_case:
        payload["per_case"] = result.per_case
    payload["checks"] = []
    return _clean(payload)
