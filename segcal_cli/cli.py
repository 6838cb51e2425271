"""The `segcal` typer application: registers the commands and maps errors to exit codes.

Exit codes (spec.md): 0 done; 1 a requested check failed; 2 bad usage or bad input (one line, no
traceback unless --debug). torch is never imported here, so `segcal --help` stays fast.
"""

from __future__ import annotations

import functools
from typing import Optional

import typer

from segcal_cli import __version__
from segcal_cli.errors import SegcalError

app = typer.Typer(
    name="segcal",
    help="Post-hoc calibration for semantic segmentation: fit, apply, evaluate and audit calibrators "
    "on logits streamed from HDF5 and Zarr.",
    epilog="Speed switches (environment): large CPU runs use numba kernels and read uncompressed HDF5 "
    "directly; SEGCAL_NUMBA=0|1 turns the numba softmax and float16 kernels (and with them apply's "
    "torch-free path for temperature scaling) off or on at any size, "
    "SEGCAL_FUSED=0|1 the fused evaluate kernel, SEGCAL_COMPILE=0|1 evaluate's torch.compile path.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)

_state = {"debug": False}


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"segcal {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Optional[bool] = typer.Option(
        None, "--version", callback=_version_callback, is_eager=True, help="Print the version and exit."
    ),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks for errors."),
) -> None:
    _state["debug"] = debug
    from segcal_cli.memory import reuse_freed_memory

    reuse_freed_memory()  # before any reader / writer thread exists


def _guarded(func):
    """Run a command; turn SegcalError into its one-line message and exit code."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except SegcalError as err:
            if _state["debug"]:
                raise
            typer.echo(f"segcal: error: {err}" if err.exit_code == 2 else f"segcal: {err}", err=True)
            raise typer.Exit(err.exit_code)
        except KeyboardInterrupt:
            typer.echo("segcal: interrupted", err=True)
            raise typer.Exit(130)

    return wrapper


def _register() -> None:
    from segcal_cli.commands import apply, check_invariance, evaluate, fit, methods

    for name, func in (
        ("fit", fit.fit_command),
        ("apply", apply.apply_command),
        ("evaluate", evaluate.evaluate_command),
        ("check-invariance", check_invariance.check_invariance_command),
        ("methods", methods.methods_command),
    ):
        app.command(name, help=func.__doc__, epilog=getattr(func, "epilog", None))(_guarded(func))


_register()


def main() -> None:
    app(prog_name="segcal")


if __name__ == "__main__":  # pragma: no cover
    main()
