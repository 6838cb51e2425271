"""The one progress bar every streaming command shows: a bar, percent, voxels/s and elapsed time."""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.text import Text


class VoxelRateColumn(ProgressColumn):
    """Throughput in millions of voxels per second."""

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        if not speed:
            return Text("-- Mvox/s", style="progress.data.speed")
        return Text(f"{speed / 1e6:,.1f} Mvox/s", style="progress.data.speed")


@contextlib.contextmanager
def voxel_progress(console: Console, total_voxels: int, quiet: bool, label: str) -> Iterator[Callable[[int], None]]:
    """Yields `advance(voxels)`; a transient bar with voxels/s unless quiet."""
    if quiet:
        yield lambda n: None
        return
    bar = Progress(TextColumn(label), BarColumn(), TaskProgressColumn(), VoxelRateColumn(), TimeElapsedColumn(),
                   console=console, transient=True)
    with bar:
        task = bar.add_task(label, total=total_voxels)
        yield lambda n: bar.advance(task, n)
