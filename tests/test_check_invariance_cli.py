"""`segcal check-invariance` as users run it: real subprocesses, real HDF5 files and artifacts on disk.

Exit codes (spec.md): 0 every declared / required property holds; 1 a declared property is violated or a
--require property does not hold; 2 bad input (one line, nothing written).
"""

from __future__ import annotations

import json
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch

from segcal_cli.calibrators import get_method, save_artifact
from segcal_cli.commands.check_invariance import check_invariance_command
from segcal_cli.errors import InputError

from tests.test_check_invariance import THEORY

SMALL = ["--voxels", "800", "--adversarial-voxels", "1200"]


def segcal(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "segcal_cli", "check-invariance", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Two 3-class synthetic cases (with the usual per-voxel logit offset), and vs / vs-ti fitted on them."""
    from segcal_cli.fitting.driver import fit_tensors
    from segcal_cli.synthetic import make_case

    root = tmp_path_factory.mktemp("ci")
    cases = [make_case((16, 20), 3, seed=s) for s in (0, 1)]
    path = root / "val.h5"
    with h5py.File(path, "w") as f:
        f["logits"] = np.stack([c.logits for c in cases])
        f["labels"] = np.stack([c.labels for c in cases])
    z = torch.from_numpy(np.stack([c.logits for c in cases], 1)).reshape(3, -1)
    y = torch.from_numpy(np.stack([c.labels for c in cases])).reshape(-1).long()
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for method in ("vs", "vs-ti"):
            save_artifact(fit_tensors(method, z, y, max_iter=30).calibrator, root / f"{method}.json", {"seed": 0})
    finally:
        torch.set_num_threads(previous)
    return root


def test_all_methods_table_matches_theory_and_json_goes_alone_to_stdout():
    out = segcal("--all-methods", "-C", 3, "--draws", 2, *SMALL, "--json", "-")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)  # stdout holds the JSON alone
    assert report["mode"] == "all-methods" and report["failed"] is False and report["failures"] == []
    assert {"segcal_version", "settings", "tolerance", "required", "audits"} <= set(report)
    assert report["tolerance"]["ti_max_abs_prob_diff"] == 1e-9
    measured = {a["method"]: tuple(a["measured"][k] for k in ("translation_invariant", "argmax_preserving",
                                                                "order_preserving")) for a in report["audits"]}
    assert measured == THEORY
    for name in THEORY:  # the human table went to stderr
        assert name in out.stderr
    assert "declared/measured" in out.stderr


def test_fitted_vs_drifts_and_fitted_vs_ti_holds_on_data(data):
    vs = segcal(data / "vs.json", data / "val.h5", *SMALL, "--require", "ti", "--json", data / "vs_audit.json")
    assert vs.returncode == 1, vs.stderr
    assert "translation_invariant FAILS (required)" in vs.stderr and "drift under a global shift" in vs.stdout
    report = json.loads((data / "vs_audit.json").read_text())  # written before exiting 1
    entry = report["audits"][0]
    assert report["failed"] and report["required"] == ["ti"] and report["settings"]["sets"]["data"] == 640  # every valid voxel (fewer than --voxels)
    assert entry["method"] == "vs" and entry["declared"]["translation_invariant"] is False
    assert entry["translation_invariance"]["max_abs_diff"] > 0.1
    rows = entry["drift"]["voxels"]
    assert rows and entry["drift"]["shifts"] == [-1e3, -100.0, -10.0, -1.0, 0.0, 1.0, 10.0, 100.0, 1e3]
    # the top-class probability moves further from its c=0 value as |c| grows, in one direction or the
    # other, until the voxel collapses onto another class (theory.md §3)
    for row in rows:
        p = row["probability"]
        away = [max(abs(p[4 + i] - p[4]), abs(p[4 - i] - p[4])) for i in (1, 2, 3, 4)]  # |c| = 1, 10, 100, 1e3
        assert all(a <= b + 1e-12 for a, b in zip(away, away[1:])) and away[-1] > 0.5, away
        assert row["argmax"][0] != row["class"] or row["argmax"][-1] != row["class"]

    # the same check of the TI sibling, in-process (interpreter start-up is the slow part of a subprocess)
    call(data / "vs-ti.json", data / "val.h5", voxels=800, adversarial_voxels=1200, require="ti",
         json_out=str(data / "ti_audit.json"))
    entry = json.loads((data / "ti_audit.json").read_text())["audits"][0]
    assert entry["measured"]["translation_invariant"] and entry["translation_invariance"]["max_abs_diff"] < 1e-9
    assert entry["drift"]["max_change"] < 1e-12


def test_tampered_artifact_declaring_argmax_is_caught(tmp_path):
    path = tmp_path / "ms.json"
    save_artifact(get_method("ms").random(3, torch.Generator().manual_seed(0)), path, {})
    payload = json.loads(path.read_text())
    payload["properties"]["argmax_preserving"] = True
    path.write_text(json.dumps(payload))
    out = segcal(path, *SMALL, "--json", tmp_path / "audit.json")
    assert out.returncode == 1
    assert "argmax_preserving VIOLATED (declared)" in out.stderr
    report = json.loads((tmp_path / "audit.json").read_text())
    assert report["failures"] == [f"{path}: argmax_preserving VIOLATED (declared)"]
    rows = {r["property"]: r for r in report["audits"][0]["properties"]}
    assert rows["argmax_preserving"]["declared"] and not rows["argmax_preserving"]["measured"]
    assert rows["translation_invariant"]["verdict"] == "does not hold (not declared)"


def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, data):
    cal = tmp_path / "ts4.json"
    save_artifact(get_method("ts").identity(4), cal, {})
    out = segcal(cal, data / "val.h5", "--json", tmp_path / "audit.json")
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and "4 classes but the data has 3" in out.stderr
    assert not (tmp_path / "audit.json").exists()


# In-process: the command function itself, for the cheap argument checks (no interpreter start-up each).
def call(*paths, **options):
    defaults = dict(method=None, all_methods=False, require=None, json_out=None, voxels=200,
                    adversarial_voxels=200, classes=3, draws=1, seed=0, logits_key="logits", labels_key="labels",
                    mask_key=None, class_axis=None, input_kind="logits", ignore_index=255, device="cpu",
                    chunk_voxels=None, quiet=True)
    defaults.update(options)
    return check_invariance_command([str(p) for p in paths], **defaults)


@pytest.mark.parametrize("paths, options, message", [
    ((), {}, "give a calibrator"),
    ((), {"method": "ts", "all_methods": True}, "not both"),
    ((), {"method": "platt"}, "unknown method 'platt'"),
    (("val.h5",), {}, "first path must be a calibrator"),
    (("cal.json",), {"method": "ts"}, "either a calibrator or --method"),
    ((), {"method": "ts", "require": "ti,calibrated"}, "unknown property"),
    ((), {"method": "ts", "draws": 0}, "--draws"),
    ((), {"method": "ts", "voxels": -1}, "--voxels"),
    ((), {"method": "ts", "classes": 1}, "--classes"),
    ((), {"method": "ts", "voxels": 0, "adversarial_voxels": 0}, "nothing to audit"),
    (("missing.json",), {}, "not found"),
])
def test_bad_arguments(paths, options, message):
    with pytest.raises(InputError, match=message):
        call(*paths, **options)


def test_data_errors_come_from_the_data_layer(tmp_path):
    bad = tmp_path / "nan.h5"
    logits = np.zeros((3, 4, 4), np.float32)
    logits[1, 2, 2] = np.nan
    with h5py.File(bad, "w") as f:
        f["logits"] = logits
    with pytest.raises(InputError, match="nope.h5: no such file"):
        call(tmp_path / "nope.h5", method="ts")
    with pytest.raises(InputError, match="(?i)nan.h5.*nan"):
        call(bad, method="ts")


def test_method_on_data_and_require(tmp_path, data, capsys):
    call(data / "val.h5", method="cms-op", require="ti,argmax,order")  # holds: no exception
    with pytest.raises(Exception) as err:
        call(data / "val.h5", method="cms-ap", require="order", adversarial_voxels=1000)
    assert type(err.value).__name__ == "CheckFailed" and "order_preserving FAILS (required)" in str(err.value)
    call(method="dc", json_out=str(tmp_path / "dc.json"))
    report = json.loads((tmp_path / "dc.json").read_text())
    assert report["mode"] == "method" and report["audits"][0]["draws"] == 1
    assert report["audits"][0]["measured"] == {"translation_invariant": True, "argmax_preserving": False,
                                               "order_preserving": False}
