"""segcal check-invariance (stub: to be implemented)."""

from __future__ import annotations

from segcal_cli.errors import InputError


def check_invariance_command() -> None:
    """Not implemented yet."""
    raise InputError("not implemented yet")
