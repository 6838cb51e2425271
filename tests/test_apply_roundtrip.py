"""The output of `segcal apply` is valid DATA: `evaluate --input-kind probs --logits-key probabilities` on it
gives the metrics that `evaluate --calibrator` computes on the original logits."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_apply_data import write_h5  # noqa: E402

import segcal_cli.commands.evaluate as evaluate_module  # noqa: E402
from segcal_cli.calibrators import get_method, save_artifact  # noqa: E402

EVALUATE_IS_STUB = "not implemented yet" in Path(evaluate_module.__file__).read_text()


def _segcal(*args) -> dict:
    proc = subprocess.run([sys.executable, "-m", "segcal_cli", *map(str, args), "--device", "cpu", "--quiet"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout) if proc.stdout.strip() else {}


def _close(a, b, path=""):
    if isinstance(a, dict):
        assert set(a) == set(b), path
        for key in a:
            _close(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and isinstance(b, float):
        assert math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-6) or (math.isnan(a) and math.isnan(b)), (path, a, b)
    else:
        assert a == b, (path, a, b)


@pytest.mark.skipif(EVALUATE_IS_STUB, reason="`segcal evaluate` is still a stub")
def test_apply_output_evaluates_like_evaluate_with_calibrator(tmp_path):
    rng = np.random.default_rng(3)
    C = 5
    logits = (rng.normal(size=(2, C, 9, 12)) * 4).astype(np.float32)
    labels = rng.integers(0, C, size=(2, 9, 12)).astype(np.uint8)
    labels[:, 0, :] = 255
    src = write_h5(tmp_path / "val.h5", {"logits": logits, "labels": labels}, {"logits": (1, C, 4, 5), "labels": (1, 4, 5)})
    cal = save_artifact(get_method("vs").random(C, torch.Generator().manual_seed(0)), tmp_path / "cal.json", {})
    out = tmp_path / "calibrated.zarr"
    from segcal_cli.calibrators import load_artifact
    from segcal_cli.io import DataOptions, open_dataset
    from segcal_cli.applying import apply_calibrator

    with open_dataset([str(src)], DataOptions(device="cpu")) as ds:  # in process: one subprocess fewer
        apply_calibrator(ds, load_artifact(cal)[0], out, calibrator_path=Path(cal))
    direct = _segcal("evaluate", src, "--calibrator", cal, "--json", "-")
    via_output = _segcal("evaluate", out, "--input-kind", "probs", "--logits-key", "probabilities", "--json", "-")
    assert via_output["voxels"] == direct["voxels"] and via_output["cases"] == direct["cases"]
    _close(via_output["uncalibrated"]["pooled"], direct["calibrated"]["pooled"])
    _close(via_output["uncalibrated"]["per_case_mean"], direct["calibrated"]["per_case_mean"])
