"""Rich rendering of `segcal fit`: a progress display (voxels/s) and the closing summary. No numerics."""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

from rich.console import Console
from rich.progress import Progress, ProgressColumn, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text


class _VoxelsColumn(ProgressColumn):
    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        rate = f"{speed / 1e6:,.1f} Mvox/s" if speed else "-- Mvox/s"
        return Text(f"{task.completed / 1e6:,.1f} Mvox read  {rate}", style="progress.data.speed")


@contextlib.contextmanager
def progress(console: Console, method: str, quiet: bool) -> Iterator:
    """Yields `advance(voxels)`: a transient spinner with voxels read and voxels/s unless quiet.

    The number of passes is not known in advance (exact fits stop when the solver converges), so this is
    a counter, not a bar.
    """
    if quiet:
        yield lambda n: None
        return
    bar = Progress(SpinnerColumn(), TextColumn(f"fitting {method}"), _VoxelsColumn(), TimeElapsedColumn(),
                   console=console, transient=True)
    with bar:
        task = bar.add_task("fit", total=None)
        yield lambda n: bar.advance(task, n)


def _nll(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.5f}"


def render_summary(console: Console, report: dict, output: str) -> None:
    """spec.md "fit": method, data seen, NLL before -> after (fit and held-out), iterations, certificate, time."""
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    sampling = report.get("sampling", {})
    table.add_row("method", f"{report['method']}  ({report['num_classes']} classes)")
    table.add_row(
        "data",
        f"{report['cases']} cases ({report['fit_cases']} fit, {len(report['val_cases'])} held out), "
        f"{report['voxels']:,} voxels, {report['valid_voxels']:,} valid in fit cases",
    )
    used = f"{report['voxels_used']:,} voxels used"
    used += " (reproducible sample, seed %d)" % report["seed"] if sampling.get("sampled") else " (every valid voxel)"
    table.add_row("fit on", used)
    table.add_row("NLL fit", f"{_nll(report['nll_before'])} -> {_nll(report['nll_after'])}")
    if "val_nll_before" in report:
        table.add_row("NLL held-out", f"{_nll(report['val_nll_before'])} -> {_nll(report['val_nll_after'])}"
                      f"  ({report['val_voxels_used']:,} voxels)")
    table.add_row("regularisation", f"lambda {report['lambda_reg']:g}, mu {report['mu_reg']:g}")
    table.add_row("solver", f"{report['solver']}: {report['iterations']} iterations, {report['evaluations']} "
                  f"evaluations, {report['passes']} pass(es) over the data")
    verdict = "[green]converged[/]" if report["converged"] else "[yellow]NOT converged[/]"
    table.add_row("certificate", f"{report['certificate']} = {report['gradient_norm']:.2e}  {verdict}")
    if not report["converged"]:
        table.add_row("", f"[yellow]{report['message']}[/] (raise --max-iter?)")
    table.add_row("time", f"{report['time_s']:.2f} s on {report['device']}")
    table.add_row("written", output)
    console.print(table)
