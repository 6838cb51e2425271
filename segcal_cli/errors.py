"""The two ways a segcal command can end badly, and their exit codes.

* `InputError` (exit 2): bad usage or bad input. Its message is one line that names the file, the case and
  what is wrong; the CLI prints it without a traceback (unless `--debug`).
* `CheckFailed` (exit 1): the command ran, but a requested check failed (`--fail-if`, `--require`, or a
  calibrator violating a property it declares).
"""

from __future__ import annotations


class SegcalError(Exception):
    exit_code = 2


class InputError(SegcalError):
    """Bad usage or bad input: exit code 2, one line, nothing written."""

    exit_code = 2

    def __init__(self, message: str, *, source: str | None = None, case: str | None = None):
        self.source = source
        self.case = case
        prefix = ""
        if source is not None:
            prefix += f"{source}"
            if case is not None and case != source:
                prefix += f" [case {case}]"
            prefix += ": "
        super().__init__(prefix + " ".join(str(message).split("\n")))


class CheckFailed(SegcalError):
    """A requested check failed: exit code 1."""

    exit_code = 1
