"""segcal check-invariance: audit translation invariance and decision preservation (spec.md, theory.md §2-4).

Parses options, gathers the voxels (a data sample or random logits, plus adversarial logits), hands them to
`segcal_cli.audit`, and passes the plain results to `segcal_cli.report.check_invariance`.
"""

from __future__ import annotations

from typing import Annotated, List, Optional

import typer

from segcal_cli.commands.common import (
    ChunkVoxels,
    ClassAxis,
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

ARTIFACT_SUFFIXES = (".json", ".pt", ".pth")
DEFAULT_DATA_VOXELS = 100_000
DEFAULT_RANDOM_VOXELS = 10_000
DEFAULT_ADVERSARIAL_VOXELS = 10_000


def check_invariance_command(
    paths: Annotated[
        Optional[List[str]],
        typer.Argument(
            help="CAL (a fitted calibrator .json/.pt) then optional DATA (HDF5, Zarr, directories, quoted globs). "
            "With --method or --all-methods every path is DATA.",
            show_default=False,
            metavar="CAL DATA",
        ),
    ] = None,
    method: Annotated[
        Optional[str], typer.Option("--method", help="Audit a family with random parameters instead of an artifact.")
    ] = None,
    all_methods: Annotated[
        bool, typer.Option("--all-methods", help="Audit every family with random parameters: one table.")
    ] = False,
    require: Annotated[
        Optional[str],
        typer.Option("--require", help="Comma list of ti, argmax, order: exit 1 unless each one holds as measured."),
    ] = None,
    json_out: Annotated[Optional[str], typer.Option("--json", help="Write the JSON report to PATH ('-' = stdout).")] = None,
    voxels: Annotated[
        Optional[int],
        typer.Option("--voxels", help="Voxels sampled from DATA (default 100000), or random logits without DATA "
                     "(default 10000).", show_default=False),
    ] = None,
    adversarial_voxels: Annotated[
        int, typer.Option("--adversarial-voxels", help="Adversarial random logits (wide magnitudes, near-ties, float16).")
    ] = DEFAULT_ADVERSARIAL_VOXELS,
    classes: Annotated[
        int, typer.Option("--classes", "-C", help="Class count for --method/--all-methods without DATA.")
    ] = 5,
    draws: Annotated[
        int, typer.Option("--draws", help="Random parameter draws per family (--method, --all-methods).")
    ] = 3,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the voxel sample, random logits and parameters.")] = 0,
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
    """Audit translation invariance (TI) and decision preservation of a calibrator, in float64.

    TI: calibrated probabilities under global logit shifts (±1e-3 … ±1e3), a random per-voxel offset (std 10)
    and the log S(z) input, against the plain input; holds when max |Δp| ≤ 1e-9. Decisions: argmax flips and
    order changes on the data sample (or random logits) and on adversarial logits. Exit 1 when a property the
    artifact (or family) declares is violated, or a --require property does not hold.
    """
    from pathlib import Path

    from segcal_cli import __version__, audit
    from segcal_cli.calibrators import METHODS, get_method
    from segcal_cli.engine import resolve_device
    from segcal_cli.report import check_invariance as report

    paths = list(paths or [])
    json_to_stdout = json_out == "-"
    console = human_console(json_to_stdout)
    required = audit.parse_require(require)
    opts = data_options(logits_key, labels_key, mask_key, class_axis, input_kind, ignore_index, device, chunk_voxels)
    if method is not None and all_methods:
        raise InputError("give either --method or --all-methods, not both")
    for name, value in (("--voxels", voxels), ("--adversarial-voxels", adversarial_voxels)):
        if value is not None and value < 0:
            raise InputError(f"{name} must be >= 0, not {value}")
    if draws < 1:
        raise InputError(f"--draws must be >= 1, not {draws}")
    if method is not None:
        family = get_method(method)
    cal_path = None
    if method is None and not all_methods:
        if not paths:
            raise InputError("give a calibrator (CAL.json / CAL.pt), --method NAME or --all-methods")
        cal_path, paths = paths[0], paths[1:]
        if Path(cal_path).suffix.lower() not in ARTIFACT_SUFFIXES:
            raise InputError(f"{cal_path}: the first path must be a calibrator (.json or .pt); "
                             "to audit a family on data use --method NAME DATA...")
    elif paths and Path(paths[0]).suffix.lower() in ARTIFACT_SUFFIXES:
        raise InputError(f"{paths[0]}: give either a calibrator or --method/--all-methods, not both")

    run_device = resolve_device(opts.device)
    cal = declared = None
    num_classes = classes
    if cal_path is not None:
        cal, info, declared = audit.load_for_audit(cal_path)
        num_classes = cal.num_classes
    elif classes < 2:
        raise InputError(f"--classes must be >= 2, not {classes}")

    data_sample = None
    if paths:
        from segcal_cli.io import open_dataset

        with open_dataset(paths, opts, require_labels=False) as ds:
            if cal is not None and ds.num_classes != cal.num_classes:
                raise InputError(f"calibrator is for {cal.num_classes} classes but the data has {ds.num_classes}",
                                 source=cal_path)
            num_classes = ds.num_classes
            target = DEFAULT_DATA_VOXELS if voxels is None else voxels
            if target > 0:
                with report.progress(console, ds.total_voxels, quiet or json_to_stdout, "sampling voxels") as advance:
                    data_sample = audit.sample_voxels(ds, target, seed, progress=advance)
    random_count = DEFAULT_RANDOM_VOXELS if voxels is None else voxels
    sets = audit.build_sets(num_classes, seed=seed, random_voxels=random_count, adversarial_voxels=adversarial_voxels,
                            data_sample=data_sample, device=run_device)

    entries = []
    if cal is not None:
        cal.to(run_device)
        result = audit.audit_calibrator(cal, sets, declared, seed=seed)
        entries.append({"name": cal_path, "kind": "artifact", "method": cal.name, "num_classes": num_classes,
                        "family_properties": type(cal).properties.as_dict(), **result})
    else:
        families = [family] if method is not None else list(METHODS.values())
        for cls in families:
            if num_classes < cls.min_classes():
                continue
            result = audit.audit_family(cls, num_classes, sets, draws=draws, seed=seed, device=run_device)
            entries.append({"name": f"{cls.name} (random parameters)", "kind": "family", "method": cls.name,
                            "num_classes": num_classes, "draws": draws,
                            "family_properties": cls.properties.as_dict(), **result})
    for entry in entries:
        audit.evaluate_entry(entry, required)

    failures = [line for entry in entries for line in entry["failures"]]
    payload = {
        "segcal_version": __version__,
        "mode": "artifact" if cal is not None else ("method" if method is not None else "all-methods"),
        "settings": {
            "seed": seed, "num_classes": num_classes, "draws": None if cal is not None else draws,
            "sets": {name: int(logits.shape[1]) for name, logits in sets.items()},
            "data": paths or None, "device": str(run_device), "dtype": "float64",
        },
        "tolerance": {
            "ti_max_abs_prob_diff": audit.TI_TOLERANCE, "global_shifts": list(audit.GLOBAL_SHIFTS),
            "offset_std": audit.OFFSET_STD, "decisions": "exact in float64 (strict inversions)",
        },
        "required": [audit.SHORT_NAMES[name] for name in required],
        "audits": entries,
        "failed": bool(failures),
        "failures": failures,
    }
    if all_methods:
        report.render_all(console, payload)
    else:
        report.render_single(console, payload)
    write_json(payload, json_out)
    if failures:
        raise CheckFailed(f"check-invariance failed: {'; '.join(failures)}")


check_invariance_command.epilog = (
    "Example: segcal check-invariance vs.json val.h5 --json audit.json ;  "
    "segcal check-invariance cal.json --require ti,argmax ;  "
    "segcal check-invariance --method ms-ti -C 19 ;  segcal check-invariance --all-methods"
)
