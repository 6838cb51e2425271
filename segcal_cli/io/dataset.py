"""Dataset: the cases found in the DATA arguments, and raw chunk-aligned reads of them.

`open_dataset` reads metadata only. `Dataset.iter_raw` yields numpy arrays exactly as stored, one read
unit at a time (see blocks.py); turning them into validated float32 logits on a device is the engine's job
(`segcal_cli.engine`), which `Dataset.stream()` hands off to.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from segcal_cli.errors import InputError
from segcal_cli.io.blocks import ReadUnit, plan
from segcal_cli.io.cases import CaseInfo, discover_cases
from segcal_cli.io.containers import Container, discover
from segcal_cli.io.options import DataOptions

# Threads that read units and convert them (the `then` of Dataset.iter_raw) in the streaming engine and
# apply's torch-free path. Two: the conversion is bound by memory bandwidth, and on this project's 2-core
# machine two threads streamed the 2 GB benchmark file in about 60% of the time of one reader feeding one
# converter; more would hold more units in memory for little gain.
READ_WORKERS = 2


@dataclass
class RawUnit:
    """One read unit as stored: logits with the case's own axis order, labels / mask spatial."""

    case_index: int
    unit: ReadUnit
    logits: np.ndarray
    labels: np.ndarray | None
    mask: np.ndarray | None
    last_of_case: bool


def _read_unit(case: CaseInfo, case_index: int, unit: ReadUnit, last: bool, read_logits, read_labels, read_mask,
               then) -> Any:
    try:
        logits = read_logits(case.logits_index(unit.region))
        labels = read_labels(case.spatial_index(unit.region)) if read_labels else None
        mask = read_mask(case.spatial_index(unit.region)) if read_mask else None
    except InputError:
        raise
    except Exception as err:  # decoding errors of damaged chunks
        detail = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise InputError(f"cannot read data (corrupt container?): {detail}",
                         source=case.source, case=case.id) from None
    raw = RawUnit(case_index, unit, logits, labels, mask, last_of_case=last)
    return then(raw) if then is not None else raw


class Dataset:
    def __init__(self, paths: list[Path], cases: list[CaseInfo], options: DataOptions, require_labels: bool):
        self.paths = paths
        self.cases = cases
        self.options = options
        self.require_labels = require_labels
        self.num_classes = cases[0].num_classes
        self._device = None

    # -- metadata ------------------------------------------------------------------------------------
    @property
    def total_voxels(self) -> int:
        return sum(c.num_voxels for c in self.cases)

    @property
    def has_labels(self) -> bool:
        return all(c.has_labels for c in self.cases)

    @property
    def device(self):
        if self._device is None:
            from segcal_cli.engine import resolve_device

            self._device = resolve_device(self.options.device)
        return self._device

    def plan(self, case_index: int) -> list[ReadUnit]:
        case = self.cases[case_index]
        return plan(case.spatial_shape, case.spatial_chunks, self.options.block_voxels)

    # -- reading -------------------------------------------------------------------------------------
    def iter_raw(self, case_indices: Sequence[int] | None = None, with_labels: bool = True, *,
                 workers: int = 1, ahead: int = 0, then: Callable[[RawUnit], Any] | None = None) -> Iterator:
        """Stored arrays, one read unit at a time, in order (`then(raw)` instead of the unit when given).

        With `workers > 1` or `ahead > 0` the reads run in a pool of `workers` threads, up to
        `workers + ahead` units in flight, and `then` runs in the worker that read the unit: a consumer that
        converts what it reads gets the conversion spread over the pool too. Direct HDF5 reads and torch
        / numba kernels release the GIL, so two workers use two cores: on this project's 2-core machine the
        engine's stream of the 2 GB benchmark file took 1.0-1.1 s with one worker and 0.62-0.65 s with two;
        one reader thread feeding one converter thread, the design before, took 0.74-1.05 s, bound by the
        converter. Results arrive in order and the first error, in that order, is raised. A container is
        closed once no read of it is pending.
        """
        indices = list(range(len(self.cases)) if case_indices is None else case_indices)
        pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix="segcal-read") \
            if (workers > 1 or ahead > 0) else None
        in_flight = max(1, workers) + max(0, ahead)
        pending: deque = deque()  # (future, container)
        opened: list[Container] = []
        container: Container | None = None

        def retire_unused() -> None:
            for old in list(opened):
                if old is not container and not any(c is old for _, c in pending):
                    old.close()
                    opened.remove(old)

        try:
            for ci in indices:
                case = self.cases[ci]
                if container is None or str(container.path) != case.source:
                    container = Container(Path(case.source))
                    opened.append(container)
                    retire_unused()
                read_logits = container.reader(container.get_array(case.logits_key))
                read_labels = (container.reader(container.get_array(case.labels_key))
                               if (with_labels and case.labels_key) else None)
                read_mask = container.reader(container.get_array(case.mask_key)) if case.mask_key else None
                units = self.plan(ci)
                for k, unit in enumerate(units):
                    task = partial(_read_unit, case, ci, unit, k == len(units) - 1, read_logits, read_labels,
                                   read_mask, then)
                    if pool is None:
                        yield task()
                        continue
                    pending.append((pool.submit(task), container))
                    if len(pending) >= in_flight:
                        future, _ = pending.popleft()
                        result = future.result()
                        retire_unused()
                        yield result
            while pending:
                future, _ = pending.popleft()
                yield future.result()
        finally:
            if pool is not None:
                for future, _ in pending:
                    future.cancel()
                pool.shutdown(wait=True)  # no read may outlive its container
            for opened_container in opened:
                opened_container.close()

    def read_spatial(self, case_index: int, which: str = "labels") -> np.ndarray:
        """A whole spatial array (labels or mask) of one case; C times smaller than its logits."""
        case = self.cases[case_index]
        key = case.labels_key if which == "labels" else case.mask_key
        if key is None:
            raise InputError(f"the case has no {which}", source=case.source, case=case.id)
        with Container(Path(case.source)) as container:
            arr = container.get_array(key)
            full = tuple(slice(0, s) for s in case.spatial_shape)
            return np.asarray(arr[case.spatial_index(full)])

    def count_nonfinite(self, case_index: int) -> int:
        """Non-finite logits in a whole case (only called once a bad block was met, to say how many)."""
        total = 0
        for raw in self.iter_raw([case_index], with_labels=False):
            if raw.logits.dtype.kind == "f":
                total += int(raw.logits.size - np.count_nonzero(np.isfinite(raw.logits)))
        return total

    def nonfinite_error(self, case_index: int) -> InputError:
        """The error for NaN or Inf logits met in a case, with their count over the whole case."""
        case = self.cases[case_index]
        return InputError(f"logits contain {self.count_nonfinite(case_index)} NaN or Inf values",
                          source=case.source, case=case.id)

    def stream(self, cases: Sequence[int] | None = None, *, with_labels: bool = True, prefetch: int = 2,
               device=None, keep_float16: bool = False):
        """Validated float32 blocks on the device; see segcal_cli.engine.stream_blocks."""
        from segcal_cli.engine import stream_blocks

        return stream_blocks(self, cases, with_labels=with_labels, prefetch=prefetch, device=device,
                             keep_float16=keep_float16)

    # -- lifetime (containers are opened per stream, so there is little to close) ------------------------
    def close(self) -> None:
        pass

    def __enter__(self) -> "Dataset":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_dataset(paths: list[str], options: DataOptions | None = None, *, require_labels: bool = False) -> Dataset:
    """Find the containers, discover and validate every case from metadata. Reads no voxel."""
    options = (options or DataOptions()).validate()
    files = discover(list(paths))
    cases: list[CaseInfo] = []
    for path in files:
        with Container(path) as container:
            cases.extend(discover_cases(container, options, require_labels))
    first = cases[0]
    for case in cases[1:]:
        if case.num_classes != first.num_classes:
            raise InputError(f"has {case.num_classes} classes but {first.id} has {first.num_classes}; "
                             f"all cases must share one class count", source=case.source, case=case.id)
    if first.num_classes < 2:  # pragma: no cover - one stored channel already becomes two classes
        raise InputError("fewer than two classes", source=first.source, case=first.id)
    return Dataset(files, cases, options, require_labels)
