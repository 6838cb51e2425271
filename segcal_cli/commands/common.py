"""Options shared by the commands that read data, and small helpers for output streams.

Declared once here as `Annotated` types so every command spells them the same way (spec.md, "Data").
"""

from __future__ import annotations

import sys
from typing import Annotated, List, Optional

import typer
from rich.console import Console

from segcal_cli.io.options import DataOptions

DataArg = Annotated[
    List[str],
    typer.Argument(
        help="HDF5 files (.h5/.hdf5), Zarr stores (.zarr dir, .zip/.zarr.zip), directories or quoted globs.",
        show_default=False,
    ),
]
OptionalDataArg = Annotated[
    Optional[List[str]],
    typer.Argument(help="Optional data (HDF5, Zarr, directories, quoted globs).", show_default=False),
]
LogitsKey = Annotated[str, typer.Option("--logits-key", help="Name of the logits array in each container or group.")]
LabelsKey = Annotated[str, typer.Option("--labels-key", help="Name of the labels array.")]
MaskKey = Annotated[Optional[str], typer.Option("--mask-key", help="Name of a boolean/0-1 mask array (voxels to use).")]
ClassAxis = Annotated[
    Optional[int],
    typer.Option(
        "--class-axis",
        help="Axis of each case's logits that holds classes (negative counts from the end). "
        "Default: auto, the one axis whose removal gives the labels' shape.",
        show_default="auto",
    ),
]
InputKind = Annotated[
    str,
    typer.Option(
        "--input-kind",
        help="logits | logprobs | probs (probabilities are clamped, then logged). One channel = binary sigmoid logit.",
    ),
]
IgnoreIndex = Annotated[int, typer.Option("--ignore-index", help="Label value that marks voxels to skip.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto (CUDA when present) | cpu | cuda | cuda:N.")]
ChunkVoxels = Annotated[
    Optional[int],
    typer.Option(
        "--chunk-voxels",
        help="Voxels per streamed block; memory is bounded by it, not by the data size.",
        show_default="sized for memory",
    ),
]
Quiet = Annotated[bool, typer.Option("--quiet", help="No progress bars.")]


def data_options(
    logits_key: str = "logits",
    labels_key: str = "labels",
    mask_key: Optional[str] = None,
    class_axis: Optional[int] = None,
    input_kind: str = "logits",
    ignore_index: int = 255,
    device: str = "auto",
    chunk_voxels: Optional[int] = None,
) -> DataOptions:
    """Build and validate the DataOptions from the shared CLI options (InputError on bad values)."""
    opts = DataOptions(
        logits_key=logits_key,
        labels_key=labels_key,
        mask_key=mask_key,
        class_axis=class_axis,
        input_kind=input_kind,
        ignore_index=ignore_index,
        device=device,
        chunk_voxels=chunk_voxels,
    )
    opts.validate()
    return opts


def human_console(json_to_stdout: bool = False) -> Console:
    """The console for human output: stderr when the JSON goes to stdout, so stdout holds JSON alone.
    (`--quiet` only hides progress bars, spec.md: the summary is still printed.)"""
    return Console(stderr=json_to_stdout, highlight=False)


def write_json(payload: dict, target: Optional[str]) -> None:
    """Write JSON to a path ('-' = stdout). Files are written atomically (temp name, then rename)."""
    import json

    if target is None:
        return
    text = json.dumps(payload, indent=2, allow_nan=False, default=_json_default)
    if target == "-":
        sys.stdout.write(text + "\n")
        sys.stdout.flush()
        return
    from segcal_cli.io.files import atomic_path

    with atomic_path(target) as tmp:
        tmp.write_text(text + "\n")


def _json_default(obj):
    import math

    try:
        import numpy as np

        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, np.ndarray):
            return obj.tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
