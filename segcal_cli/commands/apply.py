"""segcal apply: write calibrated probabilities (or logits) for DATA into one new container."""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Annotated, Optional

import typer

from segcal_cli.commands.common import (
    ChunkVoxels, ClassAxis, DataArg, DeviceOpt, IgnoreIndex, InputKind, LabelsKey, LogitsKey, MaskKey, Quiet,
    data_options, human_console, write_json,
)


# apply holds more blocks at once than a reducing command (read ahead, the block, its result, the write
# queue), so its default block is 4x smaller than the engine's: ~40 MB of float32 per block at 19 classes,
# still many whole storage chunks per write. Measured: 2M-voxel blocks peaked at 1.4 GB RSS on bench.h5.
APPLY_CHUNK_VOXELS = 1 << 19


class _Terminated(KeyboardInterrupt):
    """SIGTERM (a plain `kill`) turned into the same clean-up path as Ctrl-C."""


@contextlib.contextmanager
def _sigterm_as_interrupt():
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise _Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def apply_command(
    calibrator: Annotated[str, typer.Argument(help="Calibrator artifact (.json or .pt) from `segcal fit`.",
                                              show_default=False)],
    data: DataArg,
    out: Annotated[str, typer.Option("--out", "-o", help="Output: .h5/.hdf5 file, .zarr directory or .zip/.zarr.zip.",
                                     show_default=False)],
    output_kind: Annotated[str, typer.Option("--output-kind", help="probabilities | logits (calibrated).")]
    = "probabilities",
    dtype: Annotated[str, typer.Option("--dtype", help="float32 | float16.")] = "float32",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace OUT if it exists.")] = False,
    json_out: Annotated[Optional[str], typer.Option("--json", help="Write a summary as JSON to PATH ('-' = stdout).")]
    = None,
    logits_key: LogitsKey = "logits",
    labels_key: LabelsKey = "labels",
    mask_key: MaskKey = None,
    class_axis: ClassAxis = None,
    input_kind: InputKind = "logits",
    ignore_index: IgnoreIndex = 255,
    device: DeviceOpt = "auto",
    chunk_voxels: ChunkVoxels = None,
    quiet: Quiet = False,
) -> None:
    """Write calibrated probabilities (or logits) for DATA into OUT, in the input's layout.

    OUT holds per case `probabilities` (or `logits`) with the input's shape, class axis and chunking, plus
    copies of labels and mask, so it is valid DATA for `segcal evaluate --input-kind probs --logits-key
    probabilities`. OUT is built under a temporary name and renamed when complete: an interrupted run leaves
    no OUT. Inputs are only read.

    A temperature scaling (JSON artifact) applied on the CPU to large float16/float32 data stored classes
    first runs without torch: a numba softmax of each stored chunk, in two read threads (SEGCAL_NUMBA=0:
    the torch path, same probabilities to float32 rounding).
    """
    from pathlib import Path

    from segcal_cli.calibrators.softmax_scale import read_softmax_scale
    from segcal_cli.io import open_dataset
    from segcal_cli.applying import apply_calibrator, torch_free_possible
    from segcal_cli.io.writers import OUTPUT_DTYPES, OUTPUT_KINDS, output_format
    from segcal_cli.errors import InputError
    from segcal_cli.report.apply import progress, render_summary

    if output_kind not in OUTPUT_KINDS:
        raise InputError(f"--output-kind must be one of {', '.join(OUTPUT_KINDS)}, not {output_kind!r}")
    if dtype not in OUTPUT_DTYPES:
        raise InputError(f"--dtype must be one of {', '.join(OUTPUT_DTYPES)}, not {dtype!r}")
    output_format(Path(out))  # a bad suffix is reported before any data is opened
    if chunk_voxels is None:
        chunk_voxels = APPLY_CHUNK_VOXELS
    opts = data_options(logits_key, labels_key, mask_key, class_axis, input_kind, ignore_index, device, chunk_voxels)
    console = human_console(json_to_stdout=json_out == "-")
    with open_dataset(data, opts, require_labels=False) as ds:
        # a temperature scaling applied on the CPU needs no torch (applying.py, "the torch-free path")
        loaded = read_softmax_scale(calibrator, ds.num_classes) if torch_free_possible(ds, output_kind) else None
        if loaded is None:
            from segcal_cli.calibrators import load_artifact

            loaded = load_artifact(calibrator, expect_classes=ds.num_classes)
            loaded[0].to(ds.device)
        cal, info = loaded
        try:
            with _sigterm_as_interrupt(), progress(console, ds.total_voxels, quiet) as advance:
                result = apply_calibrator(ds, cal, Path(out), kind=output_kind, dtype=dtype, overwrite=overwrite,
                                          calibrator_path=Path(calibrator), calibrator_info=info,
                                          on_progress=advance)
        except _Terminated:
            typer.echo("segcal: terminated (SIGTERM); nothing was written", err=True)
            raise typer.Exit(143)
    summary = {"out": result.out, "format": result.format, "kind": result.kind, "dtype": result.dtype,
               "method": result.method, "sha256": result.calibrator_sha256, "cases": result.cases,
               "voxels": result.voxels, "seconds": result.seconds, "arrays": result.arrays}
    if json_out is not None:
        write_json(summary, json_out)
    if not quiet:
        render_summary(console, summary)


apply_command.epilog = (
    "Example: segcal apply cal.json test.h5 -o test_calibrated.h5 ;  "
    "segcal apply cal.json 'cases/*.zarr' -o out.zarr --output-kind logits --dtype float16"
)
