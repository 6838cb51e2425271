"""Rich rendering of `segcal check-invariance` results (plain dicts from segcal_cli.audit); no numerics."""

from __future__ import annotations

from typing import Optional

from rich.console import Console
from rich.table import Table

from segcal_cli.report.progress import voxel_progress

LABELS = {
    "translation_invariant": "translation invariance",
    "argmax_preserving": "argmax preserved",
    "order_preserving": "class order preserved",
}


def progress(console: Console, total_voxels: int, quiet: bool, label: str):
    """Yields `advance(voxels)`; a transient bar with voxels/s unless quiet."""
    return voxel_progress(console, total_voxels, quiet, label)


def _yes_no(value: Optional[bool]) -> str:
    if value is None:
        return "-"
    return "yes" if value else "no"


def _rate(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.3g}"


def _verdict_style(row: dict) -> str:
    if row["failed"]:
        return f"[bold red]{row['verdict']}[/]"
    if row["measured"]:
        return f"[green]{row['verdict']}[/]"
    return f"[yellow]{row['verdict']}[/]"


def _measured_text(entry: dict, prop: str) -> str:
    ti, dec = entry["translation_invariance"], entry["decisions"]
    if prop == "translation_invariant":
        return f"max |Δp| {ti['max_abs_diff']:.1e} ({ti['worst']})"
    if prop == "argmax_preserving":
        return f"flip rate {_rate(dec['flip_rate'])} ({dec['flips']}/{dec['argmax_voxels']})"
    return f"order-change rate {_rate(dec['order_change_rate'])} ({dec['order_changes']}/{dec['order_voxels']})"


def render_single(console: Console, report: dict) -> None:
    """One calibrator (an artifact, or one family with random parameters)."""
    entry = report["audits"][0]
    settings = report["settings"]
    draws = f", {entry['draws']} random draws" if entry.get("draws") else ""
    console.print(f"[bold]check-invariance[/] {entry['name']}: {entry['method']}, {entry['num_classes']} classes"
                  f"{draws}; float64, seed {settings['seed']}")
    console.print("voxels: " + ", ".join(f"{name} {n}" for name, n in settings["sets"].items()))

    table = Table()
    for column in ("property", "declared", "measured", "verdict"):
        table.add_column(column)
    for row in entry["properties"]:
        table.add_row(LABELS[row["property"]] + (" (required)" if row["required"] else ""),
                      _yes_no(row["declared"]), _measured_text(entry, row["property"]), _verdict_style(row))
    console.print(table)

    ti_sets = entry["translation_invariance"].get("sets", {})
    dec_sets = entry["decisions"].get("sets", {})
    if ti_sets:
        details = Table(title="per voxel set", title_justify="left")
        for column in ("set", "voxels", "max |Δp|", "mean |Δp|", "worst at", "flip rate", "order chg"):
            details.add_column(column, justify="left" if column in ("set", "worst at") else "right")
        for name, ti in ti_sets.items():
            dec = dec_sets[name]
            details.add_row(name, str(ti["voxels"]), f"{ti['max_abs_diff']:.1e}", f"{ti['mean_abs_diff']:.1e}",
                            ti["worst_test"], _rate(dec["flip_rate"]), _rate(dec["order_change_rate"]))
        console.print(details)

    if not entry["measured"]["translation_invariant"]:
        render_drift(console, entry)
    _footer(console, report)


def _probability(p: float) -> str:
    return f"{p:.3f}" if p >= 1e-3 else f"{p:.0e}"


def render_drift(console: Console, entry: dict) -> None:
    """The collapse of theory.md §3: a few voxels' calibrated top-class probability as the shift grows."""
    drift = entry["drift"]
    if not drift["voxels"]:
        return
    table = Table(title=f"drift under a global shift c ({drift.get('set', 'first')} voxels): calibrated probability "
                        "of the class on top at c=0; → k: class k is on top instead", title_justify="left")
    table.add_column("c", justify="right")
    for row in drift["voxels"]:
        table.add_column(f"#{row['sample_index']} class {row['class']}", justify="right")
    for i, shift in enumerate(drift["shifts"]):
        cells = []
        for row in drift["voxels"]:
            text = _probability(row["probability"][i])
            winner = row["argmax"][i]
            cells.append(text + (f" [red]→ {winner}[/]" if winner != row["class"] else ""))
        table.add_row(f"{shift:+g}" if shift else "0", *cells)
    console.print(table)


def render_all(console: Console, report: dict) -> None:
    """Every family with random parameters: the tool's version of the paper's characterisation."""
    settings = report["settings"]
    sets = ", ".join(f"{name}: {n}" for name, n in settings["sets"].items())
    console.print(f"[bold]check-invariance --all-methods[/]: {settings['num_classes']} classes, "
                  f"{settings['draws']} random parameter draws per family, float64, seed {settings['seed']} "
                  f"(voxels: {sets})")
    table = Table(title="each property cell: declared/measured (measured holds only if it holds for every draw)",
                  title_justify="left")
    for column in ("method", "TI", "argmax", "order", "max|Δp|", "flip rate", "order chg", "verdict"):
        table.add_column(column, justify="left" if column in ("method", "verdict") else "right")
    for entry in report["audits"]:
        cells = []
        for row in entry["properties"]:
            text = f"{_yes_no(row['declared'])}/{_yes_no(row['measured'])}"
            cells.append(f"[bold red]{text}[/]" if row["failed"] else text)
        ti, dec = entry["translation_invariance"], entry["decisions"]
        verdict = "[bold red]VIOLATED[/]" if entry["failed"] else "[green]ok[/]"
        table.add_row(entry["method"], *cells, f"{ti['max_abs_diff']:.0e}", _rate(dec["flip_rate"]),
                      _rate(dec["order_change_rate"]), verdict)
    console.print(table)
    _footer(console, report)


def _footer(console: Console, report: dict) -> None:
    tol = report["tolerance"]
    console.print(f"[dim]TI holds when max |Δp| ≤ {tol['ti_max_abs_prob_diff']:.0e} (float64) under global shifts "
                  f"{', '.join(f'{s:+g}' for s in tol['global_shifts'])}, a per-voxel offset (std "
                  f"{tol['offset_std']:g}) and the log S(z) input. Decisions are exact: a flip is another class "
                  "strictly above a unique top class; an order change is a strict inversion where the input "
                  "ranking is strict.[/]")
    if report["failed"]:
        for line in report["failures"]:
            console.print(f"[bold red]FAILED[/] {line}")
    else:
        console.print("[green]OK[/]: every declared" + (" and required" if report["required"] else "")
                      + " property holds")
