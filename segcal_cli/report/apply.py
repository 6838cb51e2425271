"""Rich rendering of `segcal apply`: the progress bar (voxels/s) and the closing summary. No numerics."""

from __future__ import annotations

import contextlib
from typing import Iterator

from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text


class _RateColumn(ProgressColumn):
    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        if not speed:
            return Text("-- Mvox/s", style="progress.data.speed")
        return Text(f"{speed / 1e6:,.1f} Mvox/s", style="progress.data.speed")


@contextlib.contextmanager
def progress(console: Console, total_voxels: int, quiet: bool) -> Iterator:
    """Yields `advance(voxels)`; a transient bar with voxels/s unless quiet."""
    if quiet:
        yield lambda n: None
        return
    bar = Progress(TextColumn("applying"), BarColumn(), TaskProgressColumn(), _RateColumn(), TimeElapsedColumn(),
                   console=console, transient=True)
    with bar:
        task = bar.add_task("apply", total=total_voxels)
        yield lambda n: bar.advance(task, n)


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
