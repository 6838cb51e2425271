"""segcal fit: fit a calibrator on validation logits and write the artifact."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from segcal_cli.commands.common import (
    ChunkVoxels, ClassAxis, DataArg, DeviceOpt, IgnoreIndex, InputKind, LabelsKey, LogitsKey, MaskKey, Quiet,
    data_options, human_console, write_json,
)


def fit_command(
    data: DataArg,
    method: Annotated[str, typer.Option("--method", "-m", help="ts vs vs-ti ms ms-ti dc ets cdc cms-ap cms-op "
                                        "(see `segcal methods`; cdc/cms-* have O(C^3) parameters).",
                                        show_default=False)],
    output: Annotated[str, typer.Option("--output", "-o", help="Artifact to write: .json or .pt.",
                                        show_default=False)],
    max_voxels: Annotated[int, typer.Option("--max-voxels", help="Size of the reproducible voxel sample used "
                                            "for fitting; 0 = every voxel, in exact passes over the stream.")]
    = 2_000_000,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the voxel sample and of the held-out case split.")] = 0,
    val_fraction: Annotated[float, typer.Option("--val-fraction", help="Share of whole cases held out: NLL "
                                                "before/after is reported on them.")] = 0.0,
    lambda_reg: Annotated[Optional[float], typer.Option("--lambda-reg", help="ODIR weight on mean squared "
                                                        "off-diagonal terms (vs: on (w-1)^2).",
                                                        show_default="1e-3; 0 for ts/ets")] = None,
    mu_reg: Annotated[Optional[float], typer.Option("--mu-reg", help="ODIR weight on the mean squared bias.",
                                                    show_default="1e-3; 0 for ts/ets")] = None,
    max_iter: Annotated[Optional[int], typer.Option("--max-iter", help="Solver iteration limit.",
                                                    show_default="100 for ts, 500 otherwise")] = None,
    json_out: Annotated[Optional[str], typer.Option("--json", help="Write the fit report as JSON to PATH "
                                                    "('-' = stdout).")] = None,
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
    """Fit a calibrator on labelled validation logits and write it to OUTPUT (.json or .pt).

    The fit minimises the mean NLL over valid voxels plus an ODIR penalty, with solvers that reach the
    optimum of these convex problems (Newton for ts, per-expert projected Newton for cdc/cms-*, L-BFGS
    otherwise) and report a convergence certificate. Deterministic for a given --seed.
    """

    from segcal_cli.calibrators import get_method, save_artifact
    from segcal_cli.calibrators.artifact import check_destination
    from segcal_cli.fitting import FitOptions, fit_dataset
    from segcal_cli.io import open_dataset
    from segcal_cli.report.fit import progress, render_summary

    get_method(method)  # unknown method: exit 2 before touching any data
    check_destination(output, source=output)  # a bad suffix or directory: exit 2 before reading any data
    options = FitOptions(method=method, max_voxels=max_voxels, seed=seed, val_fraction=val_fraction,
                         lambda_reg=lambda_reg, mu_reg=mu_reg, max_iter=max_iter).resolved()
    opts = data_options(logits_key, labels_key, mask_key, class_axis, input_kind, ignore_index, device, chunk_voxels)
    console = human_console(json_to_stdout=json_out == "-")
    with open_dataset(list(data), opts, require_labels=True) as ds:
        with progress(console, method, quiet) as advance:
            result = fit_dataset(ds, options, on_voxels=advance)
    report = result.report
    save_artifact(result.calibrator, output, report)
    render_summary(console, report, output)
    write_json({"output": str(output), **report,
                "parameters": {k: v.tolist() for k, v in result.calibrator.parameters().items()}}, json_out)


fit_command.epilog = (
    "Example: segcal fit val/*.h5 --method cms-ap -o cal.json --val-fraction 0.2 --json fit.json"
)
