"""`segcal evaluate` end to end: real HDF5 / Zarr files, real subprocess runs, JSON keys, --fail-if, bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch

from segcal_cli.metrics.checks import parse_check

METRICS = {"ece", "mce", "ace", "classwise_ece", "nll", "brier", "accuracy", "dice_mean", "iou_mean", "dice",
           "adaptive_ece"}


def run(*args, check_rc=None):
    """A real `python -m segcal_cli evaluate` process."""
    proc = subprocess.run([sys.executable, "-m", "segcal_cli", "evaluate", *map(str, args)],
                          capture_output=True, text=True, timeout=120)
    if check_rc is not None:
        assert proc.returncode == check_rc, proc.stderr + proc.stdout
    return proc


class _Result:
    def __init__(self, result):
        self.returncode = result.exit_code
        self.stdout = result.stdout
        self.stderr = result.stderr


def run_in_process(*args, check_rc=None):
    """The same command through typer's CliRunner (no interpreter start: keeps the suite fast)."""
    from typer.testing import CliRunner

    from segcal_cli.cli import app

    result = _Result(CliRunner().invoke(app, ["evaluate", *map(str, args)]))
    if check_rc is not None:
        assert result.returncode == check_rc, result.stderr + result.stdout
    return result


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from segcal_cli.calibrators import get_method, save_artifact
    from segcal_cli.synthetic import make_street_case

    root = tmp_path_factory.mktemp("evaluate")
    path = root / "val.h5"
    with h5py.File(path, "w") as f:
        for i in range(2):
            case = make_street_case(i, shape=(24, 32))
            g = f.create_group(f"case_{i}")
            g.create_dataset("logits", data=case.logits.astype(np.float16), chunks=(8, 8, 16))
            g["labels"] = case.labels
    with h5py.File(root / "nolabels.h5", "w") as f:
        f["logits"] = np.random.default_rng(0).normal(size=(8, 6, 7)).astype(np.float32)
    C = 8
    ts = get_method("ts").from_parameters(C, {"temperature": torch.tensor(1.7, dtype=torch.float64)})
    save_artifact(ts, root / "ts.json", {})
    save_artifact(get_method("ms").random(C, torch.Generator().manual_seed(0)), root / "ms.json", {})
    save_artifact(get_method("ts").from_parameters(5, {"temperature": torch.tensor(1.0, dtype=torch.float64)}),
                  root / "ts5.json", {})
    return root


def test_one_real_process_json_keys_checks_boundary_and_plot(data, tmp_path):
    """The one real `python -m segcal_cli` run (the rest go through CliRunner): stdout holds the JSON alone,
    every documented key is there, failed checks exit 1 after the JSON and the PNG are written."""
    pytest.importorskip("scipy")
    pytest.importorskip("matplotlib")
    png = tmp_path / "rel.png"
    proc = run(data / "val.h5", "--calibrator", data / "ms.json", "--per-case", "--boundary", "--plot", png,
               "--json", "-", "--quiet", "--fail-if", "flip_rate>0", "--fail-if", "calibrated.ece>1",
               "--fail-if", "uncalibrated.pooled.nll>100", "--fail-if", "ba_ece>10", check_rc=1)
    payload = json.loads(proc.stdout)
    assert {"segcal_version", "bins", "bin_rule", "cases", "voxels", "metrics", "uncalibrated", "calibrated",
            "preservation", "reliability", "per_case", "checks"} <= set(payload)
    assert payload["bins"] == 15 and payload["bin_rule"] == "right" and payload["cases"] == 2
    assert set(payload["metrics"]) == METRICS | {"iou", "iou_mean"}
    for section in ("uncalibrated", "calibrated"):
        for scope in ("pooled", "per_case_mean"):
            assert METRICS <= set(payload[section][scope])
    assert {"flip_rate", "harmful_flip_rate", "beneficial_flip_rate", "neutral_flip_rate", "order_change_rate",
            "dice_mean_delta"} <= set(payload["preservation"])
    assert set(payload["reliability"]) == {"uncalibrated", "calibrated"}
    assert set(payload["reliability"]["uncalibrated"][0]) == {"lo", "hi", "count", "confidence", "accuracy"}
    assert [row["id"] for row in payload["per_case"]] == ["val/case_0", "val/case_1"]
    assert METRICS | {"ba_ece"} <= set(payload["per_case"][0])
    assert payload["preservation"]["flip_rate"] > 0  # a random matrix scaling flips decisions
    assert 0 <= payload["calibrated"]["pooled"]["ba_ece"] <= 1
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "flip_rate>0" in proc.stderr and "1 check(s) failed" in proc.stderr  # human output on stderr
    checks = {c["expr"]: c for c in payload["checks"]}
    assert checks["flip_rate>0"]["failed"] and not checks["calibrated.ece>1"]["failed"]
    assert not checks["ba_ece>10"]["failed"] and not checks["uncalibrated.pooled.nll>100"]["failed"]
    assert checks["calibrated.ece>1"]["key"] == "calibrated.pooled.ece"


def test_results_identical_for_any_chunk_voxels_and_a_preserving_calibrator_keeps_dice(data):
    outs = []
    for chunk in (None, 100, 777):
        extra = [] if chunk is None else ["--chunk-voxels", chunk]
        proc = run_in_process(data / "val.h5", "--calibrator", data / "ts.json", "--bin-rule", "left", "--bins", 10,
                   "--json", "-", "--quiet", *extra, check_rc=0)
        outs.append(json.loads(proc.stdout))
    for other in outs[1:]:
        for section in ("uncalibrated", "calibrated"):
            a, b = outs[0][section]["pooled"], other[section]["pooled"]
            for key in a:
                if isinstance(a[key], float):
                    assert b[key] == pytest.approx(a[key], rel=1e-12, abs=1e-15), key
        assert [r["count"] for r in other["reliability"]["calibrated"]] == \
               [r["count"] for r in outs[0]["reliability"]["calibrated"]]
    first = outs[0]
    assert first["bin_rule"] == "left" and first["bins"] == 10
    assert first["calibrated"]["pooled"]["dice"] == first["uncalibrated"]["pooled"]["dice"]
    assert first["preservation"]["flip_rate"] == 0 and first["preservation"]["dice_mean_delta"] == 0
    assert first["preservation"]["order_change_rate"] == 0


def test_fail_if_exit_codes_and_listing(data, tmp_path):
    out = tmp_path / "r.json"
    proc = run_in_process(data / "val.h5", "--quiet", "--json", out, "--fail-if", "ece>=0", "--fail-if", "dice.0<0",
                          check_rc=1)
    assert "ece>=0" in proc.stderr and "1 check(s) failed" in proc.stderr
    checks = {c["expr"]: c for c in json.loads(out.read_text())["checks"]}  # written before the exit
    assert checks["ece>=0"]["failed"] and not checks["dice.0<0"]["failed"]
    run_in_process(data / "val.h5", "--quiet", "--fail-if", "ece<0", "--fail-if", "dice.0<0", check_rc=0)


def test_metrics_option_computes_only_the_metrics_named(data):
    full = json.loads(run_in_process(data / "val.h5", "--json", "-", "--quiet", "--per-case", check_rc=0).stdout)
    some = json.loads(run_in_process(data / "val.h5", "--json", "-", "--quiet", "--per-case", "--metrics",
                                     " nll,ece,dice ", check_rc=0).stdout)
    assert some["metrics"] == ["ece", "nll", "dice"]  # canonical order
    for scope in ("pooled", "per_case_mean"):
        assert set(some["uncalibrated"][scope]) == {"ece", "nll", "dice"}
        for key, value in some["uncalibrated"][scope].items():
            assert value == full["uncalibrated"][scope][key], key  # the same numbers as a full run
    assert set(some["per_case"][0]) == {"id", "voxels", "ece", "nll", "dice"}
    assert some["reliability"] == full["reliability"]  # always kept
    adaptive = json.loads(run_in_process(data / "val.h5", "--json", "-", "--quiet", "--metrics", "adaptive_ece",
                                         check_rc=0).stdout)
    assert set(adaptive["uncalibrated"]["pooled"]) == {"adaptive_ece", "adaptive_ece_bound"}
    # with a calibrator, decision preservation (and its Dice change) is reported whatever was selected
    cal = json.loads(run_in_process(data / "val.h5", "--calibrator", data / "ms.json", "--json", "-", "--quiet",
                                    "--metrics", "nll", check_rc=0).stdout)
    assert set(cal["calibrated"]["pooled"]) == {"nll"} and cal["preservation"]["dice_mean_delta"] is not None


@pytest.mark.parametrize("args, message", [
    (["--metrics", "ece,foo"], "unknown metric(s) 'foo'"),
    (["--metrics", "ba_ece"], "use --boundary"),
    (["--metrics", ","], "at least one metric"),
    (["--metrics", "ece", "--fail-if", "nll>1"], "nll is not computed: add nll to --metrics"),
    (["--metrics", "ece", "--fail-if", "uncalibrated.per_case_mean.dice.0<0.5"], "dice is not computed"),
    (["--metrics", "ece", "--fail-if", "adaptive_ece_bound>0.1"], "add adaptive_ece to --metrics"),
])
def test_metrics_option_errors_exit_2_and_write_nothing(data, tmp_path, args, message):
    out = tmp_path / "r.json"
    proc = run_in_process(data / "val.h5", "--quiet", "--json", out, *args, check_rc=2)
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not out.exists()


@pytest.mark.parametrize("expr, message", [
    ("foo>1", "unknown metric 'foo'"),
    ("ece==1", "unknown operator"),
    ("ece=>1", "unknown operator"),
    ("ece!1", "unknown operator"),
    ("ece", "expected NAME<op>VALUE"),
    ("ece>abc", "not a number"),
    ("flip_rate>0", "needs --calibrator"),
    ("ba_ece>0.1", "needs --boundary"),
    ("dice.99<0.5", "does not exist"),
])
def test_fail_if_errors_exit_2_and_write_nothing(data, tmp_path, expr, message):
    out = tmp_path / "r.json"
    proc = run_in_process(data / "val.h5", "--quiet", "--json", out, "--fail-if", expr, check_rc=2)
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_fail_if_name_resolution():
    assert parse_check("ece>0.02", calibrated=False, boundary=False).path == ("uncalibrated", "pooled", "ece")
    assert parse_check("ece>0.02", calibrated=True, boundary=False).path == ("calibrated", "pooled", "ece")
    assert parse_check("flip_rate > 0", calibrated=True, boundary=False).path == ("preservation", "flip_rate")
    assert parse_check("uncalibrated.per_case_mean.nll<=1", calibrated=False, boundary=False).path == \
        ("uncalibrated", "per_case_mean", "nll")
    assert parse_check("calibrated.dice.2<0.5", calibrated=True, boundary=False).path == \
        ("calibrated", "pooled", "dice", "2")
    check = parse_check("ba_ece>=0.1", calibrated=False, boundary=True)
    assert check.evaluate({"uncalibrated": {"pooled": {"ba_ece": None}}})["failed"]  # undefined fails
    assert not check.evaluate({"uncalibrated": {"pooled": {"ba_ece": 0.05}}})["failed"]


@pytest.mark.parametrize("args, message", [
    (["--calibrator", "ts5.json"], "5"),
    (["--bins", "0"], "--bins"),
    (["--bin-rule", "middle"], "--bin-rule"),
])
def test_bad_options_exit_2(data, tmp_path, args, message):
    args = [data / a if a.endswith(".json") else a for a in args]
    out = tmp_path / "r.json"
    proc = run_in_process(data / "val.h5", "--quiet", "--json", out, *args, check_rc=2)
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_boundary_on_data_without_labels(data):
    proc = run_in_process(data / "nolabels.h5", "--boundary", "--quiet", check_rc=2)
    assert "--boundary" in proc.stderr and "labels" in proc.stderr
    proc = run_in_process(data / "nolabels.h5", "--quiet", check_rc=2)
    assert "labels" in proc.stderr


def test_all_ignored_data(tmp_path):
    path = tmp_path / "ignored.h5"
    with h5py.File(path, "w") as f:
        f["logits"] = np.zeros((3, 4, 4), np.float32)
        f["labels"] = np.full((4, 4), 255, np.uint8)
    out = tmp_path / "r.json"
    proc = run_in_process(path, "--quiet", "--json", out)
    assert proc.returncode == 2 and not out.exists()


def test_zarr_and_hdf5_give_the_same_report(data, tmp_path):
    zarr = pytest.importorskip("zarr")
    store = tmp_path / "val.zarr"
    group = zarr.open_group(store, mode="w")
    with h5py.File(data / "val.h5", "r") as f:
        for name in ("case_0", "case_1"):
            g = group.create_group(name)
            g.create_array("logits", data=f[name]["logits"][()], chunks=(8, 12, 16))
            g.create_array("labels", data=f[name]["labels"][()])
    a = json.loads(run_in_process(data / "val.h5", "--json", "-", "--quiet", check_rc=0).stdout)
    b = json.loads(run_in_process(store, "--json", "-", "--quiet", check_rc=0).stdout)
    for key, value in a["uncalibrated"]["pooled"].items():
        if isinstance(value, float):
            assert b["uncalibrated"]["pooled"][key] == pytest.approx(value, rel=1e-12), key
