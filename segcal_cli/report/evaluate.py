"""Rich rendering of `segcal evaluate`: metric table, terminal reliability diagram, preservation summary,
per-case table, checks, and the progress bar (voxels/s). Renders the JSON payload; computes nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from rich.console import Console
from rich.table import Table

from segcal_cli.io.files import atomic_path
from segcal_cli.report.progress import voxel_progress
from rich.text import Text

_ROWS = (
    ("ece", "ECE"), ("mce", "MCE"), ("ace", "ACE (unweighted, non-empty bins)"),
    ("adaptive_ece", "adaptive ECE (equal-mass bins)"), ("classwise_ece", "classwise ECE"),
    ("ba_ece", "BA-ECE (boundary bands)"), ("nll", "NLL"), ("brier", "Brier"), ("accuracy", "accuracy"),
    ("dice_mean", "Dice (mean over classes)"), ("iou_mean", "IoU (mean over classes)"),
)


def progress(console: Console, total_voxels: int, quiet: bool):
    """Yields `advance(voxels)`; a transient bar with voxels/s unless quiet."""
    return voxel_progress(console, total_voxels, quiet, "evaluating")


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.4f}"


def metrics_table(payload: dict) -> Table:
    calibrated = "calibrated" in payload
    table = Table(title=f"Metrics ({payload['bins']} bins, bin rule '{payload['bin_rule']}')", title_justify="left")
    table.add_column("metric")
    for section in ("uncalibrated", "calibrated") if calibrated else ("uncalibrated",):
        table.add_column(f"{section} pooled", justify="right")
        table.add_column(f"{section} per-case mean", justify="right")
    for key, label in _ROWS:
        if key not in payload["uncalibrated"]["pooled"]:
            continue
        cells = [label]
        for section in ("uncalibrated", "calibrated") if calibrated else ("uncalibrated",):
            cells.append(_fmt(payload[section]["pooled"].get(key)))
            cells.append(_fmt(payload[section]["per_case_mean"].get(key)))
        table.add_row(*cells)
    return table


def reliability_diagram(rows: list[dict], title: str, width: int = 40) -> Table:
    """One line per bin: a bar of accuracy with the mean confidence marked (|)."""
    table = Table(title=title, title_justify="left", show_edge=False, box=None, padding=(0, 1))
    table.add_column("bin", justify="right")
    table.add_column("count", justify="right")
    table.add_column("conf", justify="right")
    table.add_column("acc", justify="right")
    table.add_column("accuracy bar, | = confidence", no_wrap=True)
    for row in rows:
        if not row["count"]:
            continue
        acc, conf = row["accuracy"], row["confidence"]
        filled = round(acc * width)
        mark = min(width - 1, round(conf * width))
        cells = ["█" if i < filled else "·" for i in range(width)]
        cells[mark] = "|"
        style = "green" if abs(acc - conf) < 0.02 else ("yellow" if abs(acc - conf) < 0.1 else "red")
        table.add_row(f"{row['lo']:.2f}-{row['hi']:.2f}", f"{row['count']:,}", f"{conf:.3f}", f"{acc:.3f}",
                      Text("".join(cells), style=style))
    return table


def preservation_table(pres: dict) -> Table:
    table = Table(title="Decision preservation (calibrated vs uncalibrated)", title_justify="left")
    table.add_column("quantity")
    table.add_column("value", justify="right")
    table.add_row("argmax flips", f"{pres['flips']:,} ({100 * (pres['flip_rate'] or 0):.4f}% of valid voxels)")
    table.add_row("  harmful (correct -> wrong)", f"{pres['harmful_flips']:,} ({100 * (pres['harmful_flip_rate'] or 0):.4f}%)")
    table.add_row("  beneficial (wrong -> correct)",
                  f"{pres['beneficial_flips']:,} ({100 * (pres['beneficial_flip_rate'] or 0):.4f}%)")
    table.add_row("  neutral (wrong -> wrong)", f"{pres['neutral_flips']:,} ({100 * (pres['neutral_flip_rate'] or 0):.4f}%)")
    table.add_row("ranking changed", f"{pres['order_changes']:,} ({100 * (pres['order_change_rate'] or 0):.4f}%)")
    delta = pres.get("dice_mean_delta")
    table.add_row("mean Dice delta", "-" if delta is None else f"{delta:+.6f}")
    per_class = pres.get("dice_delta") or []
    changed = [f"{k}: {d:+.4f}" for k, d in enumerate(per_class) if d]
    table.add_row("per-class Dice delta", ", ".join(changed) if changed else "none")
    return table


def per_case_table(payload: dict) -> Table:
    table = Table(title="Per case" + (" (calibrated)" if "calibrated" in payload else ""), title_justify="left")
    keys = [k for k in ("ece", "ace", "nll", "brier", "accuracy", "dice_mean", "ba_ece")
            if payload["per_case"] and k in payload["per_case"][0]]
    table.add_column("case")
    table.add_column("voxels", justify="right")
    for key in keys:
        table.add_column(key, justify="right")
    if "calibrated" in payload:
        table.add_column("flip rate", justify="right")
    for row in payload["per_case"]:
        cells = [row["id"], f"{row['voxels']:,}"] + [_fmt(row.get(k)) for k in keys]
        if "calibrated" in payload:
            cells.append(_fmt(row["preservation"]["flip_rate"]))
        table.add_row(*cells)
    return table


def checks_table(checks: list[dict]) -> Optional[Table]:
    if not checks:
        return None
    table = Table(title="Checks (--fail-if)", title_justify="left")
    table.add_column("expression")
    table.add_column("value", justify="right")
    table.add_column("verdict")
    for check in checks:
        verdict = Text("FAILED", style="bold red") if check["failed"] else Text("ok", style="green")
        table.add_row(check["expr"], _fmt(check["value"]), verdict)
    return table


def render(console: Console, payload: dict, *, seconds: float) -> None:
    console.print(f"[bold]segcal evaluate[/bold]: {payload['cases']} case(s), {payload['voxels']:,} valid voxels "
                  f"of {payload['voxels_read']:,} read in {seconds:.1f} s "
                  f"({payload['voxels_read'] / max(seconds, 1e-9) / 1e6:,.1f} Mvox/s)")
    console.print(metrics_table(payload))
    console.print("pooled = all valid voxels as one population; per-case mean = the metric per case, averaged",
                  style="dim")
    console.print(reliability_diagram(payload["reliability"]["uncalibrated"], "Reliability, uncalibrated (pooled)"))
    if "calibrated" in payload:
        console.print(reliability_diagram(payload["reliability"]["calibrated"], "Reliability, calibrated (pooled)"))
        console.print(preservation_table(payload["preservation"]))
    if "per_case" in payload:
        console.print(per_case_table(payload))
    table = checks_table(payload.get("checks", []))
    if table is not None:
        console.print(table)


def plot_reliability(payload: dict, path: str) -> None:
    """A PNG reliability diagram (matplotlib, optional extra `plot`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfect calibration")
    for section, colour in (("uncalibrated", "tab:red"), ("calibrated", "tab:blue")):
        rows = [r for r in payload["reliability"].get(section, []) if r["count"]]
        if not rows:
            continue
        ece = payload[section]["pooled"]["ece"]
        ax.plot([r["confidence"] for r in rows], [r["accuracy"] for r in rows], marker="o", color=colour,
                label=f"{section} (ECE {ece:.4f})" if ece is not None else section)
    ax.set_xlabel("mean confidence in bin")
    ax.set_ylabel("accuracy in bin")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title(f"Reliability ({payload['bins']} bins, rule '{payload['bin_rule']}', pooled)")
    ax.legend(loc="upper left")
    fig.tight_layout()
    # Whole or not at all: draw to a temporary name beside the target, then rename.
    target = Path(path)
    try:
        with atomic_path(target, suffix=target.suffix or ".png") as tmp:
            fig.savefig(tmp, dpi=120)
    finally:
        plt.close(fig)
