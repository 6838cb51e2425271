"""segcal apply (stub: to be implemented)."""

from __future__ import annotations

from segcal_cli.errors import InputError


def apply_command() -> None:
    """Not implemented yet."""
    raise InputError("not implemented yet")
