"""Thin typer commands. Each module defines one `*_command` function that `cli.py` registers."""
