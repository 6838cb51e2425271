"""`segcal apply`'s torch-free path: temperature scaling (or no calibrator) to probabilities on the CPU,
computed by the numba softmax from the stored units in the read threads (applying.py, "the torch-free
path"), with the artifact read without torch (calibrators/softmax_scale.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_apply_data import read, reference, write_h5, write_zarr  # noqa: E402

from segcal_cli import applying, fastmath  # noqa: E402
from segcal_cli.applying import apply_calibrator  # noqa: E402
from segcal_cli.calibrators import artifact, get_method, load_artifact, save_artifact  # noqa: E402
from segcal_cli.calibrators.softmax_scale import (FORMAT, SCHEMA_VERSION, TS_PROPERTIES, SoftmaxScale,  # noqa: E402
                                                  read_softmax_scale)
from segcal_cli.io import DataOptions, open_dataset  # noqa: E402

pytestmark = pytest.mark.skipif(fastmath.kernels() is None, reason=f"numba kernels unavailable: {fastmath.error()}")

C = 5
RNG = np.random.default_rng(11)


def _ts(tmp_path, temperature=1.7, classes=C, name="ts.json") -> Path:
    cal = get_method("ts").from_parameters(classes, {"temperature": torch.tensor(temperature, dtype=torch.float64)})
    return save_artifact(cal, tmp_path / name, {"note": "test"})


def _data(tmp_path, dtype=np.float16, shape=(3, C, 37, 45), name="d.h5") -> tuple[Path, np.ndarray]:
    logits = (RNG.normal(size=shape) * 4).astype(dtype)
    labels = RNG.integers(0, C, size=(shape[0], *shape[2:])).astype(np.uint8)
    path = write_h5(tmp_path / name, {"logits": logits, "labels": labels},
                    {"logits": (1, C, 16, 16), "labels": (1, 16, 16)}, compression=None)
    return path, logits


# -- the artifact reader -------------------------------------------------------------------------------
def test_reader_agrees_with_load_artifact(tmp_path):
    assert (FORMAT, SCHEMA_VERSION) == (artifact.FORMAT, artifact.SCHEMA_VERSION)
    assert TS_PROPERTIES == get_method("ts").properties.as_dict()
    path = _ts(tmp_path, 0.37)
    light, light_info = read_softmax_scale(path, C)
    cal, info = load_artifact(path, expect_classes=C)
    assert light_info == info
    assert light.softmax_scale() == cal.softmax_scale()  # the same float, bit for bit
    assert (light.name, light.num_classes, light.temperature) == ("ts", C, cal.temperature)


def test_reader_declines_what_it_does_not_handle(tmp_path):
    """None (and the usual loader then words any error) for other methods, .pt, wrong class counts and
    anything malformed."""
    good = json.loads(_ts(tmp_path).read_text())
    assert read_softmax_scale(_ts(tmp_path), C + 1) is None
    assert read_softmax_scale(tmp_path / "missing.json") is None
    vs = save_artifact(get_method("vs").identity(C), tmp_path / "vs.json")
    assert read_softmax_scale(vs) is None
    pt = save_artifact(get_method("ts").identity(C), tmp_path / "ts.pt")
    assert read_softmax_scale(pt) is None
    broken = {
        "format": {**good, "format": "other"},
        "schema": {**good, "schema_version": 2},
        "schema_bool": {**good, "schema_version": True},
        "classes": {**good, "num_classes": 1},
        "properties": {**good, "properties": {**TS_PROPERTIES, "order_preserving": False}},
        "zero": {**good, "parameters": {"temperature": 0.0}},
        "negative": {**good, "parameters": {"temperature": -1.0}},
        "list": {**good, "parameters": {"temperature": [1.0]}},
        "extra": {**good, "parameters": {"temperature": 1.0, "bias": 0.0}},
        "fit": {**good, "fit": [1]},
    }
    for name, payload in broken.items():
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(payload))
        assert read_softmax_scale(path) is None, name
    (tmp_path / "trunc.json").write_text(json.dumps(good)[:40])
    assert read_softmax_scale(tmp_path / "trunc.json") is None


# -- the computation -------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,out_dtype", [(np.float16, "float16"), (np.float32, "float32"), (np.float16, "float32")])
def test_torch_free_output_equals_the_engine_path(tmp_path, monkeypatch, dtype, out_dtype):
    """Bit-identical to the kernel path through the engine, and to the in-memory forward + softmax within
    float32 rounding (the float16 output within its own rounding)."""
    monkeypatch.setenv("SEGCAL_NUMBA", "1")  # the kernels at any size
    path, logits = _data(tmp_path, dtype)
    cal = get_method("ts").from_parameters(C, {"temperature": torch.tensor(1.3)})
    ds = open_dataset([str(path)], DataOptions(device="cpu"))
    assert applying._torch_free_scale(ds, cal, "probabilities") == cal.softmax_scale()
    apply_calibrator(ds, cal, tmp_path / "light.h5", dtype=out_dtype)
    monkeypatch.setattr(applying, "torch_free_possible", lambda ds, kind: False)  # the engine and calibrated_output
    apply_calibrator(open_dataset([str(path)], DataOptions(device="cpu")), cal, tmp_path / "engine.h5", dtype=out_dtype)
    light, engine = read(tmp_path / "light.h5", "probabilities"), read(tmp_path / "engine.h5", "probabilities")
    assert light.dtype == np.dtype(out_dtype)
    np.testing.assert_array_equal(light, engine)
    np.testing.assert_array_equal(read(tmp_path / "light.h5", "labels"), read(tmp_path / "engine.h5", "labels"))
    for n in range(logits.shape[0]):
        expected = reference(cal, logits[n], 0, "probabilities").astype(np.float64)
        tol = (2.0 ** -10, 2.0 ** -24) if out_dtype == "float16" else (4e-6, 1e-30)
        assert np.all(np.abs(light[n] - expected) <= tol[0] * expected + tol[1])


def test_no_calibrator_and_zarr_inputs_take_it_too(tmp_path, monkeypatch):
    monkeypatch.setenv("SEGCAL_NUMBA", "1")
    logits = (RNG.normal(size=(C, 40, 24)) * 3).astype(np.float32)
    src = write_zarr(tmp_path / "in.zarr", {"logits": logits}, {"logits": (C, 16, 8)}, shards={"logits": (C, 32, 16)})
    ds = open_dataset([str(src)], DataOptions(device="cpu"))
    assert applying._torch_free_scale(ds, None, "probabilities") == 1.0
    apply_calibrator(ds, None, tmp_path / "out.zarr")
    got = read(tmp_path / "out.zarr", "probabilities").astype(np.float64)
    expected = torch.softmax(torch.from_numpy(logits).double(), 0).numpy()
    assert np.all(np.abs(got - expected) <= 4e-6 * expected + 1e-30)


def test_what_takes_the_engine_path(tmp_path, monkeypatch):
    """Output logits, stored probabilities, class axis last, one channel, float64, small data without
    SEGCAL_NUMBA=1, other families, a CUDA device: the engine path."""
    monkeypatch.setenv("SEGCAL_NUMBA", "1")
    ts = get_method("ts").from_parameters(C, {"temperature": torch.tensor(2.0)})
    path, _ = _data(tmp_path)
    assert applying._torch_free_scale(open_dataset([str(path)], DataOptions(device="cpu")), ts, "logits") is None
    assert applying._torch_free_scale(open_dataset([str(path)], DataOptions(device="cpu")),
                                      get_method("vs").identity(C), "probabilities") is None
    assert applying._torch_free_scale(open_dataset([str(path)], DataOptions(device="cuda")), ts,
                                      "probabilities") is None
    assert applying._torch_free_scale(open_dataset([str(path)], DataOptions(device="cpu", input_kind="probs")),
                                      ts, "probabilities") is None
    last = write_h5(tmp_path / "last.h5", {"logits": RNG.normal(size=(20, 20, C)).astype(np.float32)})
    assert applying._torch_free_scale(open_dataset([str(last)], DataOptions(device="cpu", class_axis=-1)), ts,
                                      "probabilities") is None
    wide = write_h5(tmp_path / "f64.h5", {"logits": RNG.normal(size=(C, 20, 20))})
    assert applying._torch_free_scale(open_dataset([str(wide)], DataOptions(device="cpu")), ts, "probabilities") is None
    monkeypatch.delenv("SEGCAL_NUMBA")
    assert applying._torch_free_scale(open_dataset([str(path)], DataOptions(device="cpu")), ts, "probabilities") is None


def test_a_torch_free_calibrator_on_the_engine_path_becomes_a_real_one(tmp_path, monkeypatch):
    """A SoftmaxScale read without torch still works when the run cannot skip the engine after all."""
    monkeypatch.setenv("SEGCAL_NUMBA", "0")
    path, logits = _data(tmp_path, np.float32)
    light = SoftmaxScale("ts", C, 1.6)
    apply_calibrator(open_dataset([str(path)], DataOptions(device="cpu")), light, tmp_path / "o.h5")
    cal = get_method("ts").from_parameters(C, {"temperature": torch.tensor(1.6, dtype=torch.float64)})
    got = read(tmp_path / "o.h5", "probabilities")
    expected = reference(cal, logits[0], 0, "probabilities")
    assert np.all(np.abs(got[0] - expected) <= 4e-6 * expected + 1e-30)


# -- the command ------------------------------------------------------------------------------------------
def _segcal(*args, env_extra=None):
    env = {**os.environ, **(env_extra or {})}
    code = ("import sys\nfrom segcal_cli.cli import main\nsys.argv = ['segcal', *sys.argv[1:]]\n"
            "try:\n    main()\nexcept SystemExit as e:\n    code = e.code\nelse:\n    code = 0\n"
            "print('TORCH', 'torch' in sys.modules)\nsys.exit(code)\n")
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env)


def test_the_command_does_not_import_torch(tmp_path):
    path, logits = _data(tmp_path)
    cal = _ts(tmp_path, 0.8)
    out = tmp_path / "out.h5"
    done = _segcal("apply", str(cal), str(path), "-o", str(out), "--device", "cpu", "--quiet",
                   env_extra={"SEGCAL_NUMBA": "1"})
    assert done.returncode == 0, done.stderr
    assert "TORCH False" in done.stdout
    loaded, _ = load_artifact(cal)
    got = read(out, "probabilities").astype(np.float64)
    for n in range(logits.shape[0]):
        expected = reference(loaded, logits[n], 0, "probabilities").astype(np.float64)
        assert np.all(np.abs(got[n] - expected) <= 4e-6 * expected + 1e-30)
    # and with the kernels off, the usual path (torch) writes the same numbers to float32 rounding
    again = _segcal("apply", str(cal), str(path), "-o", str(tmp_path / "torch.h5"), "--device", "cpu", "--quiet",
                    env_extra={"SEGCAL_NUMBA": "0"})
    assert again.returncode == 0 and "TORCH True" in again.stdout
    np.testing.assert_allclose(read(tmp_path / "torch.h5", "probabilities"), got, rtol=1e-5, atol=1e-7)


def test_nonfinite_logits_are_refused_with_their_count(tmp_path):
    logits = (RNG.normal(size=(C, 30, 30)) * 2).astype(np.float16)
    logits[1, 3, 4] = np.nan
    logits[2, 20, 7] = np.inf
    logits[0, 29, 29] = -np.inf
    path = write_h5(tmp_path / "bad.h5", {"logits": logits}, {"logits": (C, 16, 16)}, compression=None)
    out = tmp_path / "out.h5"
    done = _segcal("apply", str(_ts(tmp_path)), str(path), "-o", str(out), "--device", "cpu", "--quiet",
                   env_extra={"SEGCAL_NUMBA": "1"})
    assert done.returncode == 2
    assert "3 NaN or Inf" in done.stderr and "bad.h5" in done.stderr
    assert "TORCH False" in done.stdout
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["bad.h5", "ts.json"]


def test_auto_device_is_the_cpu_only_without_a_gpu_driver(tmp_path, monkeypatch):
    """--device auto takes the torch-free path only where torch could not find a GPU: no driver files."""
    monkeypatch.setattr(applying, "_GPU_DRIVERS", (str(tmp_path / "no-such-driver"),))
    assert applying._surely_cpu("auto") and applying._surely_cpu("cpu")
    (tmp_path / "nvidia").mkdir()
    monkeypatch.setattr(applying, "_GPU_DRIVERS", (str(tmp_path / "no-such-driver"), str(tmp_path / "nvidia")))
    assert not applying._surely_cpu("auto")
    assert applying._surely_cpu("cpu")
    assert not applying._surely_cpu("cuda") and not applying._surely_cpu("cuda:0")
