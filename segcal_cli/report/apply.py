"""Rich rendering of `segcal apply`: the progress bar (voxels/s) and the closing summary. No numerics."""

from __future__ import annotations


from rich.console import Console
from rich.table import Table

from segcal_cli.report.progress import voxel_progress


def progress(console: Console, total_voxels: int, quiet: bool):
    """Yields `advance(voxels)`; a transient bar with voxels/s unless quiet."""
    return voxel_progress(console, total_voxels, quiet, "applying")


def render_summary(console: Console, summary: dict) -> None:
    """One small table: what was written where, and how fast."""
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    rate = summary["voxels"] / summary["seconds"] if summary["seconds"] > 0 else 0.0
    rows = (
        ("output", f"{summary['out']} ({summary['format']})"),
        ("content", f"{summary['kind']}, {summary['dtype']}"),
        ("calibrator", f"{summary['method']}  sha256 {summary['sha256'][:12]}"),
        ("cases", f"{summary['cases']:,}"),
        ("voxels", f"{summary['voxels']:,}"),
        ("time", f"{summary['seconds']:.2f} s  ({rate / 1e6:,.1f} Mvox/s)"),
    )
    for name, value in rows:
        table.add_row(name, value)
    console.print(table)
