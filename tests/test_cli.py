"""The program as users start it: entry points, help, version, and the cost of starting."""

from __future__ import annotations

import subprocess
import sys

import pytest

from segcal_cli import __version__

COMMANDS = ["fit", "apply", "evaluate", "check-invariance", "methods"]


def run(*args, **kw):
    return subprocess.run([sys.executable, "-m", "segcal_cli", *args], capture_output=True, text=True, **kw)


def test_version_and_module_entry_point():
    out = run("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"segcal {__version__}"


def test_help_names_the_speed_switches():
    out = run("--help", env={"COLUMNS": "200", "PATH": ""})
    assert out.returncode == 0
    for switch in ("SEGCAL_NUMBA", "SEGCAL_FUSED", "SEGCAL_COMPILE"):
        assert switch in out.stdout, switch
    assert "torch-free" in " ".join(out.stdout.split())


def test_apply_help_says_when_it_runs_without_torch():
    out = run("apply", "--help", env={"COLUMNS": "200", "PATH": ""})
    assert out.returncode == 0
    text = " ".join(out.stdout.split())
    assert "runs without torch" in text and "SEGCAL_NUMBA=0" in text


def test_help_lists_every_command():
    out = run("--help")
    assert out.returncode == 0
    for name in COMMANDS:
        assert name in out.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_help_shows_an_example(command):
    out = run(command, "--help", env={"COLUMNS": "200", "PATH": ""})
    assert out.returncode == 0, out.stderr
    text = out.stdout.lower()
    assert "example" in text, out.stdout
    after = " ".join(text.split("example", 1)[1].split())
    assert f"segcal {command}" in after, out.stdout


def test_help_does_not_import_torch():
    # `import torch` costs about a second; help and argument errors must not pay it.
    code = ("import sys; from segcal_cli import cli; "
            "assert 'torch' not in sys.modules, 'torch imported at CLI start-up'")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_unknown_command_is_usage_error():
    out = run("frobnicate")
    assert out.returncode == 2
