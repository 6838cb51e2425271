"""The `segcal apply` driver: stream every case through a calibrator into an atomic output container.

Data flow: `Dataset.stream()` (engine: read ahead, convert) -> `calibrated_output` (calibrator forward +
softmax, in cache-sized pieces) -> `WriteBehind` (io.writers: one writer thread) -> `AtomicOutput.commit()`.
A temperature scaling's probabilities on the CPU skip the engine and torch: `Dataset.iter_raw` -> the numba
softmax of each stored unit, in the read threads -> `WriteBehind` ("the torch-free path" below).
Layout, storage and safety rules live in `segcal_cli.io.writers` and docs/apply.md.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from segcal_cli import __version__
from segcal_cli.calibrators.softmax_scale import SoftmaxScale
from segcal_cli.errors import InputError
from segcal_cli.io.blocks import plan, region_shape
from segcal_cli.io.containers import Container
from segcal_cli.io.writers import (OUTPUT_DTYPES, OUTPUT_KINDS, AtomicOutput, OutputArray, WriteBehind,
                                   _file_sha256, _relative, _write, check_destination, create_array,
                                   default_dimension_names, plan_outputs, storage_like)


# --------------------------------------------------------------------------------------------- compute
# Voxels per compute piece: the (C, 16K) float32 temporaries of a 19-class piece (1.2 MB) stay in L2, so
# the forward + softmax + cast passes run from cache. Measured (19 classes, f16 -> ts -> softmax -> f16):
# 16K pieces ~250-310 M values/s, 64K-128K ~115-270, 512K ~45-80 (1-2 threads); torch.compile of the same
# map reached only ~110 M/s after a 33 s compile.
COMPUTE_VOXELS = 1 << 14


_LOG2_E = 1.4426950408889634


def _softmax_classes_first(z, out=None, scale: float = 1.0):
    """softmax over dim 0 of a (C, n) piece, written into `out` (any float dtype) when given.

    exp dominates, and torch's CPU exp is slow here (1.2-1.6 ns per value on this project's AVX2 machines)
    while exp2 is faster (0.8 ns): p_k = 2^((z_k - max) log2 e) / sum. The extra multiply rounds the
    argument, a relative error below 4e-6 for the tiniest probabilities (p ~ e^-87) and ~1e-7 near 1.
    Summing the classes with a (1, C) @ (C, n) product instead of a strided reduction was ~1.5x faster
    than torch.softmax(z, 0). 19 x 16K float32 pieces, one thread: 1.73 -> 1.32 s per 1e9 values (exp ->
    exp2), 1.50 s including the rounding to float16 in the division."""
    import torch

    e = torch.sub(z, z.amax(0, keepdim=True)).mul_(_LOG2_E * scale).exp2_()
    ones = torch.ones((1, z.shape[0]), dtype=z.dtype, device=z.device)
    if out is None:
        return e.div_(ones @ e)
    return torch.div(e, ones @ e, out=out)


def calibrated_output(cal, logits, kind: str, binary: bool, dtype=None, kernels: bool = True):
    """(C, n) logits -> the (C', n) result written for one block, in `dtype` (default float32).

    probabilities: softmax over classes of the calibrated logits; logits: the calibrated logits as the
    calibrator returns them. One stored channel (binary sigmoid input) -> one channel out: p(class 1), or
    z1 - z0, the sigmoid logit whose two-class softmax is the calibrated one. Computed in pieces of
    COMPUTE_VOXELS, each written (and rounded to `dtype`) straight into the result.
    """
    import torch

    dtype = dtype or torch.float32
    n = logits.shape[1]
    out = torch.empty((1 if binary else logits.shape[0], n), dtype=dtype, device=logits.device)
    # temperature scaling: the softmax folds 1/T in, instead of a forward pass that rescales every logit
    scale = cal.softmax_scale() if (cal is not None and kind == "probabilities") else None
    s = 1.0 if scale is None else scale
    rescaling_only = cal is None or scale is not None
    kernel = None
    if kernels:
        from segcal_cli import fastmath

        kernel = fastmath.softmax_into  # False when it cannot run here (then torch)
    if kind == "probabilities" and not binary and rescaling_only and kernel and kernel(logits, out, s):
        return out  # the whole block in one call, tiled inside; reads float16 as stored
    if logits.dtype == torch.float16:  # kept as stored by the stream for the kernel above; torch gets float32
        logits = logits.float()
    for start in range(0, n, COMPUTE_VOXELS):
        piece = logits[:, start:start + COMPUTE_VOXELS]
        target = out[:, start:start + COMPUTE_VOXELS]
        if kind == "logits":
            z = cal.forward(piece) if cal is not None else piece
            target[...] = z[1:2] - z[0:1] if binary else z
            continue
        z = piece if rescaling_only else cal.forward(piece)
        if binary:
            target[...] = _softmax_classes_first(z, scale=s)[1:2]
        elif not (kernel and kernel(z, target, s)):  # else torch, rounded to out's dtype in the division
            _softmax_classes_first(z, target, scale=s)
    return out


def _uses_kernels(ds) -> bool:
    """Whether this run's softmax uses the numba kernels (kernel_choice: large data, or SEGCAL_NUMBA=1)."""
    from segcal_cli import kernel_choice

    if ds.device.type != "cpu" or not kernel_choice.wanted(ds.total_voxels * ds.num_classes):
        return False
    from segcal_cli import fastmath

    return fastmath.kernels() is not None


def _reads_float16(cal, kind: str, ds) -> bool:
    """Whether calibrated_output's numba softmax serves this run, so the stream can hand it float16 logits
    as stored (no float32 copy of every block): probabilities of a temperature scaling (or of no calibrator)
    on the CPU, with the kernels in use."""
    if kind != "probabilities" or (cal is not None and cal.softmax_scale() is None):
        return False
    return _uses_kernels(ds)


# ------------------------------------------------------------------------------ the torch-free path
# Temperature scaling (and no calibrator) to probabilities on the CPU: the softmax of scale * z, computed by
# the numba kernel straight from the stored numpy arrays of each read unit, in the read pool's threads
# (Dataset.iter_raw), so reading and the softmax use both cores and torch is never imported (commands/apply.py
# reads the artifact with calibrators/softmax_scale.py). On this project's 2-core machine the CLI applying
# `ts` to the 2 GB benchmark file went from 6.2-6.6 s to 2.8 s, 1.3-1.9 s of which had been importing torch
# (benchmarks/bench_apply.py). Results are bit-identical to the kernel path through the engine (tested).

_GPU_DRIVERS = ("/proc/driver/nvidia", "/dev/nvidia0", "/dev/kfd")
_FLOATS = (np.dtype(np.float16), np.dtype(np.float32))


def _surely_cpu(device: str) -> bool:
    """Whether --device resolves to the CPU, known without importing torch: `cpu`, or `auto` on a machine
    without a GPU driver (torch would find no CUDA device there). Anything else: torch decides."""
    if device == "cpu":
        return True
    return device == "auto" and not any(os.path.exists(p) for p in _GPU_DRIVERS)


def torch_free_possible(ds, kind: str) -> bool:
    """Whether the data and options allow the torch-free path (given a temperature scaling): probabilities
    on the CPU of multi-class float16 / float32 logits stored classes first, large enough for the kernels."""
    from segcal_cli import kernel_choice

    if kind != "probabilities" or ds.options.input_kind == "probs" or not _surely_cpu(ds.options.device):
        return False
    for case in ds.cases:
        if case.class_axis != 0 or case.stored_classes < 2 or np.dtype(case.dtype) not in _FLOATS:
            return False
    if not kernel_choice.wanted(ds.total_voxels * ds.num_classes):
        return False
    from segcal_cli import fastmath

    if fastmath.kernels() is None:
        return False
    # float16 is read by finite_half_bits_to_float: exact with F16C; without it, unless subnormals are flushed
    return not any(np.dtype(c.dtype) == np.float16 for c in ds.cases) or fastmath.finite_half_conversion_is_exact()


def _torch_free_scale(ds, cal, kind: str) -> Optional[float]:
    """The softmax scale when this run takes the torch-free path, else None."""
    scale = 1.0 if cal is None else cal.softmax_scale()
    if scale is None or not scale > 0 or not torch_free_possible(ds, kind):
        return None
    return scale


def _softmax_unit(raw, ds, scale: float, np_dtype, found: dict):
    """One read unit as stored (C, *space) -> (case index, unit, its probabilities in np_dtype, voxels)."""
    stored = np.ascontiguousarray(raw.logits)
    C = stored.shape[0]
    n = stored.size // C
    flat = stored.reshape(-1)
    if stored.dtype == np.float16:
        flat = flat.view(np.uint16)  # numba has no float16: the kernel reads the bits
        bad = found["count_nonfinite_half"](flat)
    else:
        bad = found["count_nonfinite_single"](flat)
    if bad:
        raise ds.nonfinite_error(raw.case_index)
    out = np.empty(stored.shape, np_dtype)
    half = out.dtype == np.float16
    target = out.reshape(-1).view(np.uint16) if half else out.reshape(-1)
    found["softmax_tiles"](flat, target, n, 0, C, n, np.float32(scale), half)
    return raw.case_index, raw.unit, out, n


def _softmax_units(ds, scale: float, np_dtype):
    """(case index, read unit, probabilities as the unit is stored, voxels), in order."""
    from segcal_cli import fastmath
    from segcal_cli.io.dataset import READ_WORKERS

    found = fastmath.kernels()
    return ds.iter_raw(with_labels=False, workers=READ_WORKERS, ahead=2,
                       then=lambda raw: _softmax_unit(raw, ds, scale, np_dtype, found))


def _calibrated_units(ds, cal, kind: str, dtype: str, np_dtype):
    """(case index, read unit, calibrated output as the unit is stored, voxels), in order, through the
    engine's stream (torch): any calibrator, output kind and device."""
    import torch

    torch_dtype = torch.float16 if dtype == "float16" else torch.float32
    units: list = []
    unit_pos = pending = 0
    unit_buffer: Optional[np.ndarray] = None
    current_case = -1
    voxels = 0
    kernels = _uses_kernels(ds)
    stream = ds.stream(with_labels=False, keep_float16=_reads_float16(cal, kind, ds))
    try:
        for block in stream:
            case = ds.cases[block.case_index]
            if block.case_index != current_case:  # blocks follow ds.plan(case) unit by unit, in order
                current_case, units, unit_pos, pending = block.case_index, ds.plan(block.case_index), 0, 0
            unit = units[unit_pos]
            result = calibrated_output(cal, block.logits, kind, case.stored_classes == 1, torch_dtype, kernels)
            result = result.cpu().numpy().reshape(result.shape[0], *block.shape)
            if case.class_axis != 0:
                result = np.moveaxis(result, 0, case.class_axis)
            voxels += block.num_voxels
            if len(unit.blocks) == 1:
                data = result
            else:  # a storage chunk larger than a block: assemble the whole chunk, write it once
                if pending == 0:
                    shape = list(region_shape(unit.region))
                    shape.insert(case.class_axis, result.shape[case.class_axis])
                    unit_buffer = np.empty(shape, dtype=np_dtype)
                local = [slice(b.start - u.start, b.stop - u.start) for b, u in zip(block.region, unit.region)]
                local.insert(case.class_axis, slice(None))
                unit_buffer[tuple(local)] = result
                pending += 1
                data = unit_buffer if pending == len(unit.blocks) else None
            if data is not None:
                yield block.case_index, unit, data, voxels
                unit_pos, pending, unit_buffer, voxels = unit_pos + 1, 0, None, 0
    finally:
        stream.close()


# --------------------------------------------------------------------------------------------- driver
@dataclass
class ApplyResult:
    out: str
    format: str
    kind: str
    dtype: str
    cases: int
    voxels: int
    seconds: float
    writer_busy_seconds: float
    arrays: list[str]
    method: str
    calibrator_sha256: Optional[str]


def _unit_chunks(case, block_voxels: int) -> tuple[int, ...]:
    """The planner's read-unit shape for a case, as a chunk grid in the stored axis order."""
    units = plan(case.spatial_shape, case.spatial_chunks, block_voxels)
    spatial = region_shape(units[0].region)
    per_case = list(spatial)
    per_case.insert(case.class_axis, case.logits_shape[case.class_axis])
    return tuple(([1] if case.batch_index is not None else []) + per_case)


COPY_VOXELS = 1 << 22  # labels / mask copy unit: small dtypes, so bigger reads than the logits stream


def _copy_units(info) -> list:
    return plan(info.shape, info.chunks, COPY_VOXELS)


def _copy_array(src, dst, writer: WriteBehind) -> None:
    """Copy a labels / mask array unit by unit along its own chunk grid (whole output chunks per write)."""
    for unit in _copy_units(Container.info(src)):
        writer.submit(_write, dst, unit.region, np.asarray(src[unit.region]))


def _logits_dimension_names(src, case, batched: bool) -> tuple[str, ...]:
    names = Container.info(src).dimension_names
    if names is not None:
        return names
    per_case = list(default_dimension_names(len(case.spatial_shape)))
    per_case.insert(case.class_axis, "class")
    return tuple((["case"] if batched else []) + per_case)


def _create_outputs(ds, output: AtomicOutput, arrays: list[OutputArray], case_groups: dict[int, str],
                    inputs: dict[str, Container], writer: WriteBehind, kind: str, np_dtype,
                    common_attributes: dict) -> dict[int, Any]:
    """Create every output array (metadata written once, at creation) and queue the labels / mask copies."""
    opts = ds.options
    targets: dict[int, Any] = {}
    for spec in arrays:
        if spec.source not in inputs:
            inputs[spec.source] = Container(Path(spec.source))
        container = inputs[spec.source]
        src = container.get_array(spec.input_key)
        case = ds.cases[spec.cases[0]]
        info = Container.info(src)
        storage = storage_like(src, output.fmt, spec.batched, _unit_chunks(case, opts.block_voxels))
        names = _logits_dimension_names(src, case, spec.batched)
        attributes = {**common_attributes, "kind": kind, "class_axis": case.class_axis,
                      "num_classes": case.num_classes, "binary_sigmoid": case.stored_classes == 1,
                      "source": spec.source, "source_key": spec.input_key}
        dst = create_array(output, spec.output_key, info.shape, np_dtype, storage, names, attributes)
        for ci in spec.cases:
            targets[ci] = dst
        class_position = case.class_axis + (1 if spec.batched else 0)
        spatial_names = tuple(n for i, n in enumerate(names) if i != class_position)
        for key, what in ((case.labels_key, "labels"), (case.mask_key, "mask")):
            if key is None:
                continue
            sarr = container.get_array(key)
            sinfo = Container.info(sarr)
            copy_grid = region_shape(_copy_units(sinfo)[0].region)
            sstore = storage_like(sarr, output.fmt, False, copy_grid)
            sdst = create_array(output, case_groups[spec.cases[0]] + _relative(key, case.group), sinfo.shape,
                                sinfo.dtype, sstore, spatial_names,
                                {"kind": what, "ignore_index": opts.ignore_index})
            _copy_array(sarr, sdst, writer)
    return targets


def apply_calibrator(ds, cal, out: Path, *, kind: str = "probabilities", dtype: str = "float32",
                     overwrite: bool = False, calibrator_path: Optional[Path] = None,
                     calibrator_info: Optional[dict] = None,
                     on_progress: Optional[Callable[[int], None]] = None, writer_depth: int = 2) -> ApplyResult:
    """Stream every case of `ds` through `cal` into OUT. Everything is validated before the first write.

    `cal=None` writes the inputs' canonical logits (or their softmax) unchanged: a plain converter, used
    by the benchmark as the no-calibrator baseline.
    """
    if kind not in OUTPUT_KINDS:
        raise InputError(f"--output-kind must be one of {', '.join(OUTPUT_KINDS)}, not {kind!r}")
    if dtype not in OUTPUT_DTYPES:
        raise InputError(f"--dtype must be one of {', '.join(OUTPUT_DTYPES)}, not {dtype!r}")
    out = Path(out)
    protected = [Path(calibrator_path)] if calibrator_path is not None else []
    fmt = check_destination(out, list(ds.paths), protected, overwrite)
    np_dtype = OUTPUT_DTYPES[dtype]
    opts = ds.options
    method = (calibrator_info or {}).get("method") or (cal.name if cal is not None else "none")
    digest = _file_sha256(Path(calibrator_path)) if calibrator_path is not None else None
    arrays, case_groups = plan_outputs(ds.cases, kind)
    common = {"segcal_version": __version__, "calibrator_method": method, "calibrator_sha256": digest,
              "ignore_index": opts.ignore_index, "input_kind": opts.input_kind}
    root_attributes = {**common, "kind": kind, "num_classes": ds.num_classes, "sources": [str(p) for p in ds.paths]}

    start = time.perf_counter()
    output = AtomicOutput(out, fmt, overwrite, root_attributes)
    writer: Optional[WriteBehind] = None
    stream = None
    inputs: dict[str, Container] = {}
    voxels = 0
    try:
        writer = WriteBehind(writer_depth)
        targets = _create_outputs(ds, output, arrays, case_groups, inputs, writer, kind, np_dtype, common)
        scale = _torch_free_scale(ds, cal, kind)
        if scale is not None:
            stream = _softmax_units(ds, scale, np_dtype)
        else:
            if isinstance(cal, SoftmaxScale):  # read without torch, but the run needs the engine after all
                from segcal_cli.calibrators import get_method

                cal = get_method("ts").from_parameters(cal.num_classes, {"temperature": cal.temperature})
            stream = _calibrated_units(ds, cal, kind, dtype, np_dtype)
        for case_index, unit, data, unit_voxels in stream:
            writer.submit(_write, targets[case_index], ds.cases[case_index].logits_index(unit.region), data)
            voxels += unit_voxels
            if on_progress is not None:
                on_progress(unit_voxels)
        stream.close()
        stream = None
        writer.finish()
        _close_all(inputs)
        output.commit()
    except BaseException as err:
        _clean_up(stream, writer, output, inputs)
        if isinstance(err, OSError):  # disk full, permissions changed under us, ...
            raise InputError(f"cannot write the output: {err.strerror or err}", source=str(out)) from None
        raise
    return ApplyResult(out=str(out), format=fmt, kind=kind, dtype=dtype, cases=len(ds.cases), voxels=voxels,
                       seconds=time.perf_counter() - start, writer_busy_seconds=writer.busy_seconds,
                       arrays=[a.output_key for a in arrays], method=method, calibrator_sha256=digest)


def _close_all(inputs: dict[str, Container]) -> None:
    for container in inputs.values():
        container.close()
    inputs.clear()


def _clean_up(stream, writer: Optional[WriteBehind], output: AtomicOutput, inputs: dict[str, Container]) -> None:
    """Stop reading and writing, then remove the temporary. A second Ctrl-C must not cut this short."""
    import signal

    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        if stream is not None:
            stream.close()
        if writer is not None:
            writer.abort()
        _close_all(inputs)
        output.abort()
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
