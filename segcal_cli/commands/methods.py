"""segcal methods: the calibrator families, their parameter counts and declared guarantees."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from segcal_cli.errors import InputError


def methods_command(
    classes: Annotated[
        int, typer.Option("--classes", "-C", help="Class count used for the parameter column.")
    ] = 19,
    json_out: Annotated[
        Optional[str], typer.Option("--json", help="Also write the table as JSON to PATH ('-' = stdout only).")
    ] = None,
) -> None:
    """List the calibrators with their translation-invariance (TI) and decision guarantees.

    Class-conditional families (cdc, cms-ap, cms-op) have O(C^3) parameters: they suit small to moderate C.
    """
    if classes < 2:  # before the imports below (torch): a bad option fails at once
        raise InputError(f"--classes must be at least 2, got {classes}")

    from rich.console import Console
    from rich.table import Table

    from segcal_cli.calibrators import METHODS
    from segcal_cli.commands.common import write_json
    rows = [
        {
            "name": name,
            "description": cls.description,
            "num_parameters": cls.num_parameters(classes),
            **cls.properties.as_dict(),
        }
        for name, cls in METHODS.items()
    ]
    if json_out is not None:
        write_json({"num_classes": classes, "methods": rows}, json_out)
        if json_out == "-":
            return
    mark = {True: "[green]yes[/]", False: "[red]no[/]"}
    table = Table(title=f"segcal calibrators (parameters for C = {classes})")
    for column, justify in (("method", "left"), ("description", "left"), ("params", "right"),
                            ("TI", "center"), ("argmax", "center"), ("order", "center")):
        table.add_column(column, justify=justify, overflow="fold")
    for row in rows:
        table.add_row(
            row["name"],
            row["description"],
            f"{row['num_parameters']:,}",
            mark[row["translation_invariant"]],
            mark[row["argmax_preserving"]],
            mark[row["order_preserving"]],
        )
    Console(highlight=False).print(table)


methods_command.epilog = "Example: segcal methods --classes 4"
