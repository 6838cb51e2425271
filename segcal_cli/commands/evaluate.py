"""segcal evaluate: calibration and segmentation metrics in one streamed read, before and after a calibrator;
a CI gate with --fail-if."""

from __future__ import annotations

import time
from typing import Annotated, List, Optional

import typer

from segcal_cli.commands.common import (
    ChunkVoxels,
    ClassAxis,
    DataArg,
    DeviceOpt,
    IgnoreIndex,
    InputKind,
    LabelsKey,
    LogitsKey,
    MaskKey,
    Quiet,
    data_options,
    human_console,
    write_json,
)
from segcal_cli.errors import CheckFailed, InputError


def _require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise InputError("--plot needs matplotlib: pip install 'segcal[plot]'") from None


def evaluate_command(
    data: DataArg,
    calibrator: Annotated[Optional[str], typer.Option(
        "--calibrator", help="A fitted calibrator (.json/.pt): report uncalibrated, calibrated and what it did "
        "to the decisions, from one read of the data.")] = None,
    bins: Annotated[int, typer.Option("--bins", help="Equal-width confidence bins.")] = 15,
    bin_rule: Annotated[str, typer.Option(
        "--bin-rule", help="Where a confidence exactly on an edge goes: right = (lo, hi] (fiducio, sklearn), "
        "left = [lo, hi), torchmetrics = [lo, hi) with 1.0 in an extra bin.")] = "right",
    metrics: Annotated[Optional[str], typer.Option(
        "--metrics", help="Comma-separated metrics to compute (default: all), e.g. 'ece,nll,brier,dice'; "
        "skipping classwise_ece / adaptive_ece saves most of the time. Others are absent from the JSON. "
        "Known: ece, mce, ace, adaptive_ece, classwise_ece, nll, brier, accuracy, dice_mean, iou_mean, dice, iou.")] = None,
    compile_stats: Annotated[Optional[bool], typer.Option(
        "--compile/--no-compile", help="Compile the per-voxel statistics with torch.compile (needs a C++ "
        "compiler; falls back to eager on failure). Default: SEGCAL_COMPILE=0/1 if set, else only for "
        "large data.")] = None,
    per_case: Annotated[bool, typer.Option("--per-case", help="Add the per-case table (and JSON 'per_case').")] = False,
    boundary: Annotated[bool, typer.Option(
        "--boundary", help="Boundary-aware calibration error (ba_ece): bands by distance to the label boundary; "
        "reads each case's label volume; needs scipy.")] = False,
    json_out: Annotated[Optional[str], typer.Option("--json", help="Write the JSON report to PATH ('-' = stdout).")] = None,
    plot: Annotated[Optional[str], typer.Option("--plot", help="Write a reliability diagram PNG (needs matplotlib).")] = None,
    fail_if: Annotated[Optional[List[str]], typer.Option(
        "--fail-if", help="Exit 1 if NAME<op>VALUE holds (op: < <= > >=); repeatable. Bare names are pooled "
        "metrics (calibrated with --calibrator); flip_rate etc. are preservation keys; dotted JSON paths work.")] = None,
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
    """Calibration and segmentation metrics, pooled and per case, before and after a calibrator.

    Calibration: ECE, MCE, ACE, adaptive and classwise ECE, NLL, Brier (BA-ECE with --boundary); segmentation:
    Dice, IoU. With --calibrator also after calibration, from the same read, and which decisions it changed."""
    from segcal_cli import __version__
    from segcal_cli.metrics.binning import check_bins
    from segcal_cli.metrics.checks import parse_checks, parse_metric_list, validate_class_indices

    check_bins(bins, bin_rule)
    selected = parse_metric_list(metrics)
    checks = parse_checks(fail_if, calibrated=calibrator is not None, boundary=boundary, metrics=selected)
    if plot is not None:
        _require_matplotlib()
    if boundary:
        from segcal_cli.metrics.boundary import require_scipy

        require_scipy()
    opts = data_options(logits_key, labels_key, mask_key, class_axis, input_kind, ignore_index, device, chunk_voxels)
    console = human_console(json_to_stdout=json_out == "-")

    import torch

    from segcal_cli.io import open_dataset
    from segcal_cli.metrics.boundary import boundary_distance
    from segcal_cli.metrics.evaluation import Evaluation, result_payload
    from segcal_cli.report.evaluate import plot_reliability, progress, render

    with open_dataset(data, opts, require_labels=False) as ds:
        unlabelled = [c.id for c in ds.cases if not c.has_labels]
        if unlabelled:
            need = "--boundary and evaluate need" if boundary else "evaluate needs"
            case = next(c for c in ds.cases if not c.has_labels)
            raise InputError(f"{need} labels: no {opts.labels_key!r} array ({len(unlabelled)} case(s) without)",
                             source=case.source, case=case.id)
        validate_class_indices(checks, ds.num_classes)
        calibrate = None
        if calibrator is not None:
            from segcal_cli.calibrators import load_artifact

            cal, _info = load_artifact(calibrator, expect_classes=ds.num_classes)
            cal = cal.to(ds.device)
            calibrate = cal.forward
        evaluation = Evaluation(ds.num_classes, [c.id for c in ds.cases], [c.num_voxels for c in ds.cases],
                                bins=bins, bin_rule=bin_rule, boundary=boundary, calibrate=calibrate,
                                device=ds.device, metrics=selected, compile=compile_stats)
        distance_case, distance_map = None, None
        started = time.perf_counter()
        with torch.inference_mode(), progress(console, ds.total_voxels, quiet) as advance:
            # the fused kernel reads float16 logits as stored: no float32 copy of every block
            for block in ds.stream(keep_float16=evaluation.fused):
                distances = None
                if boundary:
                    if block.case_index != distance_case:
                        distance_map = boundary_distance(ds.read_spatial(block.case_index, "labels"))
                        distance_case = block.case_index
                    distances = torch.from_numpy(distance_map[block.region].reshape(-1)).to(ds.device)
                evaluation.add_block(block.case_index, block.logits, block.labels, block.valid, distances)
                advance(block.num_voxels)
        result = evaluation.finish()
        seconds = time.perf_counter() - started
        if evaluation.compile_error is not None:
            console.print(f"[dim]torch.compile failed, evaluated eagerly: {evaluation.compile_error}[/dim]")

    if result.voxels == 0:
        raise InputError("no valid voxels: every label is the ignore index or masked out", source=str(data[0]))
    payload = result_payload(result, version=__version__, per_case=per_case)
    payload["checks"] = [check.evaluate(payload) for check in checks]
    render(console, payload, seconds=seconds)
    write_json(payload, json_out)
    if plot is not None:
        plot_reliability(payload, plot)
        console.print(f"reliability diagram written to {plot}")
    failed = [c for c in payload["checks"] if c["failed"]]
    if failed:
        listing = "; ".join(f"{c['expr']} (value {c['value']})" for c in failed)
        raise CheckFailed(f"{len(failed)} check(s) failed: {listing}")


evaluate_command.epilog = (
    "Example: segcal evaluate val.h5 --calibrator ts.json --per-case --json report.json "
    "--fail-if 'calibrated.ece>0.02' --fail-if 'flip_rate>0'"
)
