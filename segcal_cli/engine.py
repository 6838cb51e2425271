"""The streaming engine: stored read units -> validated float32 logit blocks on the device.

Two read threads (Dataset.iter_raw's pool) each read a unit and turn it into validated blocks while the
consumer works on the current one; direct HDF5 reads, numcodecs decoding, the numba kernels and torch kernels
release the GIL, so reading, conversion and compute overlap. On CUDA the read threads pin the stored arrays
and one converter thread moves them to the device, where conversion happens: float16 crosses PCIe at half
the bytes.

Per block the engine:
* moves the class axis first and flattens space (C order) -> (C, n);
* converts the input kind to logits (probs -> log(max(p, tiny)); one channel z -> two classes (0, z));
* checks logits are finite, probabilities in [0, 1], labels in [0, C) or the ignore index;
* builds `valid` from the ignore index and the mask.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch

from segcal_cli.errors import InputError
from segcal_cli.io.blocks import Region, region_shape, region_size
from segcal_cli.io.cases import CaseInfo
from segcal_cli.io.dataset import READ_WORKERS, Dataset, RawUnit
from segcal_cli.memory import reuse_freed_memory

reuse_freed_memory()  # for library users; the CLI calls it before starting any thread


@dataclass
class Block:
    logits: torch.Tensor  # (C, n) float32, classes first, canonical logits
    labels: torch.Tensor | None  # (n,) int64; 0 where invalid
    valid: torch.Tensor  # (n,) bool
    case_index: int
    case_id: str
    region: Region
    shape: tuple[int, ...]

    @property
    def num_voxels(self) -> int:
        return self.logits.shape[1]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InputError(f"--device {name}: CUDA is not available on this machine (use --device cpu or auto)")
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise InputError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) present")
    return torch.device(name)


_STOP = object()

_worker = threading.local()


def _single_threaded(fn):
    """fn() with torch limited to one thread in this (pool) thread. torch's thread count is per calling
    thread; the conversions are memory-bound, and one thread each leaves the other cores to the consumer's
    team instead of oversubscribing them, which on a busy 2-core machine made every parallel region wait for
    descheduled threads (5-10x slower)."""
    if not getattr(_worker, "single_threaded", False):
        torch.set_num_threads(1)
        _worker.single_threaded = True
    return fn()


class _Prefetcher:
    """Runs an iterator in a thread, `depth` items ahead; re-raises its errors in the consumer."""

    def __init__(self, source: Iterator, depth: int, transform=None):
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._source = source
        self._transform = transform
        self._thread = threading.Thread(target=self._run, name="segcal-prefetch", daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            for item in self._source:
                if self._transform is not None:
                    item = self._transform(item)
                if not self._put(item):
                    return
            self._put(_STOP)
        except BaseException as err:  # handed to the consumer thread
            self._put(err)
        finally:
            close = getattr(self._source, "close", None)
            if close is not None:
                close()

    def __iter__(self):
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def _pin(raw: RawUnit) -> RawUnit:
    """On CUDA: copy the stored arrays into page-locked memory so the host->device copy is asynchronous."""
    raw.logits = torch.from_numpy(np.ascontiguousarray(raw.logits)).pin_memory()
    if raw.labels is not None:
        raw.labels = torch.from_numpy(np.ascontiguousarray(raw.labels)).pin_memory()
    if raw.mask is not None:
        raw.mask = torch.from_numpy(np.ascontiguousarray(raw.mask)).pin_memory()
    return raw


def _as_tensor(array, device: torch.device) -> torch.Tensor:
    if isinstance(array, torch.Tensor):
        return array.to(device, non_blocking=True)
    array = np.asarray(array)
    if array.dtype == np.uint16 or array.dtype == np.uint32 or array.dtype == np.uint64:
        array = array.astype(np.int64)  # torch has no unsigned types above uint8
    if array.dtype.kind == "b":
        array = array.astype(np.uint8)
    if not array.flags.writeable:
        array = array.copy()
    return torch.from_numpy(array).to(device)


def _half_to_float_checked(stored: torch.Tensor, half_to_float, case: CaseInfo, dataset: Dataset) -> torch.Tensor:
    """float16 -> float32 and the finiteness check in one pass (fastmath.half_to_float): the torch way is a
    conversion and then a sum over the float32 copy, 4 bytes per value more of memory traffic, and this
    stream is bound by memory bandwidth. Exact either way."""
    out = torch.empty(stored.shape, dtype=torch.float32)
    if half_to_float(_half_bits(stored), out.numpy().reshape(-1)):
        _raise_nonfinite(case, dataset)
    return out


def _half_bits(stored: torch.Tensor) -> np.ndarray:
    """The bits of a float16 CPU tensor as a flat uint16 array, as the numba kernels read them."""
    return np.ascontiguousarray(stored.numpy()).reshape(-1).view(np.uint16)


def _raise_nonfinite(case: CaseInfo, dataset: Dataset) -> None:
    raise dataset.nonfinite_error(dataset.cases.index(case))


def _to_logits(stored: torch.Tensor, case: CaseInfo, input_kind: str, dataset: Dataset,
               kernels: dict | None = None, keep_float16: bool = False) -> torch.Tensor:
    """(C_stored, *shape) in the stored dtype -> (C, n) float32 canonical logits; float16 as stored with
    `keep_float16` (multi-class logits or log-probabilities on the CPU, when the numba kernels are there)."""
    checked = False
    if kernels is not None and stored.dtype == torch.float16 and stored.device.type == "cpu" \
            and input_kind != "probs":
        if keep_float16 and case.stored_classes > 1:
            if kernels["count_nonfinite_half"](_half_bits(stored)):
                _raise_nonfinite(case, dataset)
            x = stored.movedim(case.class_axis, 0) if case.class_axis != 0 else stored
            return x.reshape(x.shape[0], -1)
        x, checked = _half_to_float_checked(stored, kernels["half_to_float"], case, dataset), True
    else:
        x = stored if stored.dtype == torch.float32 else stored.to(torch.float32)  # one copy, on the device
    if case.class_axis != 0:
        x = x.movedim(case.class_axis, 0)
    x = x.reshape(x.shape[0], -1)
    if input_kind == "probs":
        bad = ~((x >= 0) & (x <= 1))
        if bool(bad.any()):
            n_bad = int(bad.sum())
            raise InputError(f"{n_bad} probabilities outside [0, 1] (or NaN) in a block with --input-kind probs",
                             source=case.source, case=case.id)
        if case.stored_classes == 1:
            x = torch.cat([1.0 - x, x], dim=0)
        x = x.clamp_min(torch.finfo(torch.float32).tiny).log()
    else:
        # One reduction instead of an element-wise test: a NaN or Inf anywhere makes the sum
        # non-finite, and a finite sum proves every element finite (a float32 sum that overflows only sends us
        # to the exact test). Only on failure count exactly.
        if not checked and not bool(torch.isfinite(x.sum())) and not bool(torch.isfinite(x).all()):
            _raise_nonfinite(case, dataset)
        if case.stored_classes == 1:
            if input_kind == "logprobs":  # log p1 -> (log(1 - p1), log p1)
                other = torch.log1p(-torch.exp(x.clamp_max(0.0))).clamp_min(-1e30)
                x = torch.cat([other, x], dim=0)
            else:  # a sigmoid logit z is the two-class softmax of (0, z)
                x = torch.cat([torch.zeros_like(x), x], dim=0)
    return x


def _labels_and_valid(raw_labels, raw_mask, n: int, case: CaseInfo, options, device, num_classes: int,
                      kernels: dict | None = None):
    """Labels as int64 (0 where invalid) and the validity mask, in as few passes as possible (one, with the
    numba kernel, for uint8 labels on the CPU)."""
    valid = None
    labels = None
    if (kernels is not None and raw_labels is not None and device.type == "cpu"
            and np.asarray(raw_labels).dtype == np.uint8 and 0 <= options.ignore_index <= 255):
        stored = np.ascontiguousarray(raw_labels).reshape(-1)
        labels = torch.empty(stored.shape[0], dtype=torch.int64)
        valid = torch.empty(stored.shape[0], dtype=torch.bool)
        top = kernels["labels_and_valid_u8"](stored, options.ignore_index, labels.numpy(), valid.numpy())
        if top >= num_classes:  # the torch path below finds and words the error
            return _labels_and_valid(raw_labels, raw_mask, n, case, options, device, num_classes)
        raw_labels = None
    if raw_labels is not None:
        lab = _as_tensor(raw_labels, device).reshape(-1)  # stored dtype: compare before widening
        info = torch.iinfo(lab.dtype) if lab.dtype != torch.bool else None
        ignore = options.ignore_index
        if info is not None and info.min <= ignore <= info.max:
            valid = lab != ignore
            lab = lab.masked_fill(~valid, 0)
        low, high = (int(v) for v in torch.aminmax(lab))
        if low < 0 or high >= num_classes:
            bad = lab[(lab < 0) | (lab >= num_classes)]
            raise InputError(
                f"{bad.numel()} labels outside [0, {num_classes}) that are not the ignore index "
                f"{ignore} (e.g. {int(bad[0])}); set --ignore-index if that value marks ignored voxels",
                source=case.source, case=case.id)
        labels = lab.to(torch.int64)
    if raw_mask is not None:
        in_mask = _as_tensor(raw_mask, device).reshape(-1) != 0
        valid = in_mask if valid is None else valid & in_mask
    if valid is None:
        valid = torch.ones(n, dtype=torch.bool, device=device)
    return labels, valid


def _slice_unit(raw: RawUnit, block_region: Region, case: CaseInfo):
    """The part of a read unit that one block covers (a view; no copy when the unit is one block)."""
    if len(raw.unit.blocks) == 1:
        return raw.logits, raw.labels, raw.mask
    local = tuple(slice(b.start - u.start, b.stop - u.start) for b, u in zip(block_region, raw.unit.region))
    logit_index = list(local)
    logit_index.insert(case.class_axis, slice(None))
    logits = raw.logits[tuple(logit_index)]
    labels = raw.labels[local] if raw.labels is not None else None
    mask = raw.mask[local] if raw.mask is not None else None
    return logits, labels, mask


@dataclass
class _ConvertedUnit:
    blocks: list[Block]
    any_valid: bool
    last_of_case: bool


def _prepare_labels(raw: RawUnit, dataset: Dataset, kernels: dict | None = None) -> tuple[RawUnit, list]:
    """Reader stage on the CPU: each block's labels and validity (and the first error in them) made next to
    the read, which leaves the converter stage, the busier one, only the logits (bench_stream)."""
    case = dataset.cases[raw.case_index]
    prepared = []
    for region in raw.unit.blocks:
        _, labels_np, mask_np = _slice_unit(raw, region, case)
        n = region_size(region)
        try:
            prepared.append(_labels_and_valid(labels_np, mask_np, n, case, dataset.options, torch.device("cpu"),
                                              dataset.num_classes, kernels))
        except InputError as err:
            prepared.append(err)  # raised by the converter, in order, after this unit's logits are checked
            break
    return raw, prepared


def _convert(item: tuple[RawUnit, list | None], dataset: Dataset, device: torch.device, check_valid: bool,
             kernels: dict | None = None, keep_float16: bool = False) -> _ConvertedUnit:
    """A stored read unit (and its prepared labels, on the CPU) -> its validated float32 blocks on the device."""
    raw, prepared = item
    case = dataset.cases[raw.case_index]
    options = dataset.options
    blocks = []
    any_valid = False
    for k, region in enumerate(raw.unit.blocks):
        logits_np, labels_np, mask_np = _slice_unit(raw, region, case)
        logits = _to_logits(_as_tensor(logits_np, device), case, options.input_kind, dataset, kernels, keep_float16)
        if prepared is not None:
            if isinstance(prepared[k], InputError):
                raise prepared[k]
            labels, valid = prepared[k]
        else:
            labels, valid = _labels_and_valid(labels_np, mask_np, logits.shape[1], case, options, device,
                                              dataset.num_classes)
        if check_valid and not any_valid:
            any_valid = bool(valid.any())
        blocks.append(Block(logits, labels, valid, raw.case_index, case.id, region, region_shape(region)))
    return _ConvertedUnit(blocks, any_valid, raw.last_of_case)


def _half_kernels(dataset: Dataset, device: torch.device, keep_float16: bool) -> dict | None:
    """fastmath's kernels for float16 data read on the CPU when they repay loading numba (large data, or a
    consumer that reads float16 itself), else None (torch converts)."""
    if device.type != "cpu" or not any(np.dtype(c.dtype) == np.float16 for c in dataset.cases):
        return None
    from segcal_cli import kernel_choice

    if not keep_float16 and not kernel_choice.wanted(dataset.total_voxels * dataset.num_classes):
        return None  # the conversion is exact either way: the choice changes no result
    from segcal_cli import fastmath

    return fastmath.kernels()


def stream_blocks(dataset: Dataset, cases: Sequence[int] | None = None, *, with_labels: bool = True,
                  prefetch: int = 2, device=None, keep_float16: bool = False) -> Iterator[Block]:
    """Blocks of the chosen cases in a deterministic order.

    `keep_float16`: a consumer that reads float16 itself (the fused numba kernels) gets float16 logits as
    stored (checked finite, classes first) instead of a float32 copy, when the data is float16 logits of
    several classes on the CPU and numba is there; everything else is float32 as usual. Saves the
    conversion pass and half the memory traffic of the blocks.

    With `prefetch > 0`, READ_WORKERS threads each read a unit and turn it into validated float32 blocks (on
    the CPU; on CUDA they read and pin, and one converter thread moves the units to the device), up to
    `READ_WORKERS + prefetch` units ahead of the consumer, delivered in order. Direct HDF5 reads,
    numcodecs decoding, the numba kernels and torch kernels release the GIL, so on two cores reading,
    converting and the consumer's own work overlap. Errors in any thread surface here, in order.
    """
    device = torch.device(device) if device is not None else dataset.device
    check_valid = dataset.require_labels and with_labels
    kernels = _half_kernels(dataset, device, keep_float16)
    if keep_float16 and kernels is not None:
        from segcal_cli.fastmath import finite_half_conversion_is_exact

        # consumers convert kept float16 with finite_half_bits_to_float: exact with F16C; without it, exact
        # unless the CPU flushes subnormals
        keep_float16 = finite_half_conversion_is_exact()
    # the reader stage: pinning on CUDA (labels are checked on the device), the labels themselves on the CPU
    if device.type == "cuda":
        prepare = lambda raw: (_pin(raw), None)  # noqa: E731
    else:
        prepare = lambda raw: _prepare_labels(raw, dataset, kernels)  # noqa: E731
    convert = lambda raw: _convert(raw, dataset, device, check_valid, kernels, keep_float16)  # noqa: E731
    stages: list[_Prefetcher] = []
    if prefetch <= 0:
        units = (convert(prepare(raw)) for raw in dataset.iter_raw(cases, with_labels=with_labels))
    elif device.type == "cuda":
        # read and pin in the pool; the device work in one converter thread, in order
        pinned = dataset.iter_raw(cases, with_labels=with_labels, workers=READ_WORKERS, ahead=prefetch,
                                  then=prepare)
        stages.append(_Prefetcher(pinned, prefetch, convert))
        units = iter(stages[0])
    else:
        units = dataset.iter_raw(cases, with_labels=with_labels, workers=READ_WORKERS, ahead=prefetch,
                                 then=lambda raw: _single_threaded(lambda: convert(prepare(raw))))
    case_has_valid = False
    try:
        for unit in units:
            case_has_valid = case_has_valid or unit.any_valid
            yield from unit.blocks
            if unit.last_of_case:
                if check_valid and not case_has_valid:
                    case = dataset.cases[unit.blocks[-1].case_index]
                    raise InputError("every voxel is ignored or masked: nothing to use in this case",
                                     source=case.source, case=case.id)
                case_has_valid = False
    finally:
        for stage in stages:
            stage.close()
        close = getattr(units, "close", None)
        if close is not None:
            close()
