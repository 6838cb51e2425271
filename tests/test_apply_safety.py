"""`segcal apply` safety: inputs never change, OUT appears whole or not at all, bad destinations exit 2.

Real `segcal` subprocesses are interrupted mid-write with SIGINT, SIGTERM and SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))
from test_apply_data import file_digest, read, reference, write_h5, write_zarr  # noqa: E402

from segcal_cli.calibrators import get_method, save_artifact  # noqa: E402
from segcal_cli.cli import app  # noqa: E402

C = 4
RNG = np.random.default_rng(11)


@pytest.fixture()
def small(tmp_path):
    logits = RNG.normal(size=(C, 6, 7)).astype(np.float32)
    labels = RNG.integers(0, C, size=(6, 7)).astype(np.uint8)
    src = write_h5(tmp_path / "val.h5", {"logits": logits, "labels": labels}, {"logits": (C, 3, 4), "labels": (3, 4)})
    cal = get_method("ts").from_parameters(C, {"temperature": 1.5})
    cal_path = save_artifact(cal, tmp_path / "cal.json", {})
    return tmp_path, src, Path(cal_path), cal, logits


def _cli(*args):
    result = CliRunner().invoke(app, ["apply", *map(str, args), "--quiet", "--device", "cpu"])
    return result.exit_code, result.output


def _listing(directory: Path):
    return sorted(p.name for p in directory.iterdir())


def _assert_bad(directory: Path, code: int, output: str, needle: str, before) -> None:
    assert code == 2, output
    lines = [line for line in output.strip().splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("segcal: error:") and needle in lines[0], output
    assert _listing(directory) == before, "something was written"


def test_bad_destinations_and_class_mismatch_exit_2_writing_nothing(small):
    tmp_path, src, cal_path, _, _ = small
    (tmp_path / "notes.txt").write_text("a plain file")
    before = _listing(tmp_path)
    digest = file_digest(src)
    _assert_bad(tmp_path, *_cli(cal_path, src, "-o", src, "--overwrite"), "input", before)
    _assert_bad(tmp_path, *_cli(cal_path, src, "-o", tmp_path / "out.npz"), "unsupported output type", before)
    _assert_bad(tmp_path, *_cli(cal_path, src, "-o", tmp_path / "missing" / "out.h5"), "does not exist", before)
    _assert_bad(tmp_path, *_cli(cal_path, src, "-o", tmp_path / "notes.txt" / "out.h5"), "not a directory",
                before)
    _assert_bad(tmp_path, *_cli(cal_path, src, "-o", cal_path), "unsupported output type", before)
    other = save_artifact(get_method("ts").from_parameters(3, {"temperature": 1.0}), tmp_path / "c3.json", {})
    before = _listing(tmp_path)
    _assert_bad(tmp_path, *_cli(other, src, "-o", tmp_path / "out.h5"), "3 classes but the data has 4", before)
    assert file_digest(src) == digest


def test_output_inside_or_equal_to_a_zarr_input_is_refused(tmp_path):
    logits = RNG.normal(size=(C, 5, 6)).astype(np.float32)
    src = write_zarr(tmp_path / "val.zarr", {"logits": logits})
    cal_path = save_artifact(get_method("ts").from_parameters(C, {"temperature": 1.0}), tmp_path / "cal.json", {})
    digest = file_digest(src)
    for out in (src, src / "nested.zarr"):
        code, output = _cli(cal_path, src, "-o", out, "--overwrite")
        assert code == 2 and "input" in output, output
    assert file_digest(src) == digest


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_unwritable_directory_exit_2(small):
    tmp_path, src, cal_path, _, _ = small
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    code, output = _cli(cal_path, src, "-o", locked / "out.h5")
    assert code == 2 and "not writable" in output


def test_existing_output_refused_then_replaced_with_overwrite(small):
    tmp_path, src, cal_path, cal, logits = small
    out = tmp_path / "out.h5"
    out.write_bytes(b"precious")
    code, output = _cli(cal_path, src, "-o", out)
    assert code == 2 and "already exists" in output and out.read_bytes() == b"precious"
    code, output = _cli(cal_path, src, "-o", out, "--overwrite")
    assert code == 0, output
    np.testing.assert_allclose(read(out, "probabilities"), reference(cal, logits, 0, "probabilities"), rtol=1e-5, atol=1e-7)
    # a Zarr directory: the old tree is moved away, the new one renamed in, the old one deleted
    out_dir = tmp_path / "out.zarr"
    out_dir.mkdir()
    (out_dir / "sentinel").write_text("old")
    code, output = _cli(cal_path, src, "-o", out_dir, "--overwrite")
    assert code == 0, output
    assert not (out_dir / "sentinel").exists()
    np.testing.assert_allclose(read(out_dir, "probabilities"), reference(cal, logits, 0, "probabilities"),
                               rtol=1e-5, atol=1e-7)
    assert not [p for p in tmp_path.iterdir() if ".segcal-" in p.name]


# -- interrupting a real run --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def slow_case(tmp_path_factory):
    """Enough tiny chunks that a run lasts a few seconds: time to interrupt it mid-write."""
    directory = tmp_path_factory.mktemp("slow")
    logits = np.random.default_rng(0).normal(size=(C, 40, 48, 48)).astype(np.float16)
    labels = np.random.default_rng(1).integers(0, C, size=(40, 48, 48)).astype(np.uint8)
    src = write_h5(directory / "big.h5", {"logits": logits, "labels": labels},
                   {"logits": (C, 2, 8, 8), "labels": (2, 8, 8)})
    cal_path = save_artifact(get_method("vs").random(C, torch.Generator().manual_seed(0)), directory / "cal.json", {})
    return directory, src, Path(cal_path)


@pytest.fixture(scope="module")
def slow_torch_free_case(tmp_path_factory):
    """A temperature scaling (the torch-free path with SEGCAL_NUMBA=1) over many one-chunk units."""
    directory = tmp_path_factory.mktemp("slow_ts")
    logits = np.random.default_rng(2).normal(size=(C, 160, 48, 48)).astype(np.float16)
    src = write_h5(directory / "big.h5", {"logits": logits}, {"logits": (C, 1, 8, 8)})
    cal_path = save_artifact(get_method("ts").from_parameters(C, {"temperature": torch.tensor(1.4)}),
                             directory / "ts.json", {})
    return directory, src, Path(cal_path)


def _start(cal_path, src, out, chunk_voxels=128, env=None):
    cmd = [sys.executable, "-m", "segcal_cli", "apply", str(cal_path), str(src), "-o", str(out), "--quiet",
           "--device", "cpu", "--chunk-voxels", str(chunk_voxels)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})


def _wait_for_temporary(proc, directory: Path, name: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(p.name.startswith(f".{name}.segcal-tmp-") for p in directory.iterdir()):
            time.sleep(0.3)  # well inside the write phase
            assert proc.poll() is None, "the run ended before it could be interrupted"
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    raise AssertionError("the run never started writing")


@pytest.mark.parametrize("case,sig,code,suffix,chunk_voxels,env", [
    ("slow_case", signal.SIGINT, 130, ".h5", 128, None),
    ("slow_case", signal.SIGTERM, 143, ".zarr", 128, None),
    # SIGINT while the read threads compute the softmax of the torch-free path: they stop, nothing is left
    ("slow_torch_free_case", signal.SIGINT, 130, ".h5", 64, {"SEGCAL_NUMBA": "1"}),
])
def test_clean_interrupt_leaves_no_output_and_no_temporary(request, case, sig, code, suffix, chunk_voxels, env):
    directory, src, cal_path = request.getfixturevalue(case)
    digest = file_digest(src)
    out = directory / f"out_{sig.name}{suffix}"
    proc = _start(cal_path, src, out, chunk_voxels, env)
    _wait_for_temporary(proc, directory, out.name)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert not out.exists()
    assert not [p for p in directory.iterdir() if ".segcal-" in p.name], _listing(directory)
    assert file_digest(src) == digest


def test_sigkill_leaves_no_output_and_the_next_run_cleans_up(slow_case):
    directory, src, cal_path = slow_case
    digest = file_digest(src)
    out = directory / "out_kill.h5"
    proc = _start(cal_path, src, out)
    _wait_for_temporary(proc, directory, out.name)
    proc.kill()
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()
    leftovers = [p for p in directory.iterdir() if p.name.startswith(f".{out.name}.segcal-tmp-")]
    assert len(leftovers) == 1  # SIGKILL cannot be caught: the temporary stays, OUT never appears
    code, output = _cli(cal_path, src, "-o", out)  # no --overwrite needed: OUT does not exist
    assert code == 0, output
    assert out.exists()
    assert not [p for p in directory.iterdir() if ".segcal-" in p.name], "the stale temporary was not removed"
    assert file_digest(src) == digest
