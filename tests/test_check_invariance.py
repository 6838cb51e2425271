"""The numerics of `segcal check-invariance` (segcal_cli.audit): TI and decision measures, verdicts, sampling.

Expectations come from theory.md §2-4: which families are TI, which keep the argmax or the full ranking,
and the collapse of shift-sensitive calibrators under a growing shift (§3).
"""

from __future__ import annotations

import json
import math

import h5py
import numpy as np
import pytest
import torch

from segcal_cli import audit
from segcal_cli.calibrators import METHODS, get_method, save_artifact
from segcal_cli.errors import InputError
from segcal_cli.io import DataOptions, open_dataset

# theory.md §3: (translation invariant, argmax preserving, order preserving) for every parameter value,
# and, for C >= 3 and generic parameters, the properties that are not guaranteed do fail.
THEORY = {
    "ts": (True, True, True),
    "vs": (False, False, False),
    "vs-ti": (True, False, False),
    "ms": (False, False, False),
    "ms-ti": (True, False, False),
    "dc": (True, False, False),
    "ets": (True, True, True),
    "cdc": (True, False, False),
    "cms-ap": (True, True, False),
    "cms-op": (True, True, True),
}


def as_tuple(measured: dict) -> tuple:
    return tuple(measured[name] for name in audit.PROPERTY_NAMES)


@pytest.fixture(scope="module")
def small_sets():
    return audit.build_sets(4, seed=3, random_voxels=1500, adversarial_voxels=3000)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny tensors: intra-op threads only cost time here (and much more on a busy CI machine).
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# --------------------------------------------------------------------------------------------- plain maps
def test_temperature_lambda_is_ti_and_keeps_order(small_sets):
    result = audit.audit(lambda z: z / 0.37, small_sets, None)
    assert as_tuple(result["measured"]) == (True, True, True)
    assert result["translation_invariance"]["max_abs_diff"] < 1e-11
    assert result["decisions"]["flips"] == 0 and result["decisions"]["order_changes"] == 0


def test_unequal_vector_weights_are_not_ti_and_the_drift_grows_with_the_shift(small_sets):
    w = torch.tensor([1.0, 1.3, 0.8, 1.1], dtype=torch.float64)[:, None]
    result = audit.audit(lambda z: w * z, small_sets, None)
    assert not result["measured"]["translation_invariant"]
    tests = result["translation_invariance"]["sets"]["random"]["tests"]
    by_shift = {t["shift"]: t["max_abs_diff"] for t in tests if t["kind"] == "global_shift"}
    # |Δp| grows with |c| (≈ linear while small, saturating towards 1): 1e-3 < 1 < 10 <= 100
    assert 1e-6 < by_shift[1e-3] < by_shift[1.0] < by_shift[10.0] <= by_shift[100.0] <= 1.0
    assert by_shift[1e3] > 0.99
    # equal weights: a constant shift of the calibrated logits, hence TI (theory.md §3, vs row)
    same = audit.audit(lambda z: 1.7 * z + 0.3, small_sets, None)
    assert same["measured"]["translation_invariant"]


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def test_drift_matches_the_analytic_collapse():
    # g(z) = w ⊙ z with w = (1, 2): at shift c the two-class probability of class 0 is sigmoid(z0 - 2 z1 - c)
    w = torch.tensor([1.0, 2.0], dtype=torch.float64)[:, None]
    logits = torch.tensor([[0.5, -1.0], [0.0, 0.0]], dtype=torch.float64)  # input top classes 0 and 1
    out = audit.drift(lambda z: w * z, logits)
    assert out["shifts"] == list(audit.DRIFT_SHIFTS)
    first, second = out["voxels"]
    assert first["class"] == 0 and second["class"] == 1
    for shift, p0, p1 in zip(out["shifts"], first["probability"], second["probability"]):
        expect0 = sigmoid(0.5 - shift)
        expect1 = sigmoid(shift + 1.0)  # class 1 logit 2c, class 0 logit -1 + c
        assert p0 == pytest.approx(expect0, rel=1e-12, abs=1e-300)
        assert p1 == pytest.approx(expect1, rel=1e-12, abs=1e-300)
    # collapse: at +1e3 everything is class 1 (the largest w), at -1e3 class 0
    assert first["argmax"][-1] == 1 and second["argmax"][0] == 0
    assert out["max_change"] == pytest.approx(1.0)


def test_drift_of_a_ti_map_is_flat(small_sets):
    out = audit.drift(lambda z: z / 2.0, small_sets["random"])
    assert len(out["voxels"]) == audit.DRIFT_VOXELS
    assert out["max_change"] < 1e-12
    assert len({row["class"] for row in out["voxels"]}) > 1  # different classes are shown


# --------------------------------------------------------------------------------------------- float64
def test_float64_evaluation_keeps_ti_calibrators_passing_at_1e3_shifts():
    logits = audit.random_logits(5, 2000, torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(0)
    # the same temperature scaling, computed in float32: the round-off of z + 1e3 (ulp 6e-5) alone moves
    # probabilities far beyond the tolerance -- which is why the audit insists on float64
    float32 = audit.translation_invariance(lambda z: (z.float() / 0.5).double(), logits, generator)
    assert float32["max_abs_diff"] > 1e-6 and not float32["holds"]
    ts = get_method("ts").from_parameters(5, {"temperature": 0.5})
    exact = audit.translation_invariance(ts.forward, logits, torch.Generator().manual_seed(0))
    assert exact["holds"] and exact["max_abs_diff"] < 1e-12
    shifts = [t for t in exact["tests"] if t["kind"] == "global_shift"]
    assert {t["shift"] for t in shifts} == {1e-3, -1e-3, 1.0, -1.0, 10.0, -10.0, 100.0, -100.0, 1e3, -1e3}


def test_a_forward_that_returns_float32_is_refused():
    with pytest.raises(TypeError, match="float64"):
        audit.calibrated_logits(lambda z: z.float(), torch.zeros(3, 4, dtype=torch.float64))


def test_nan_output_counts_as_infinitely_wrong():
    logits = torch.tensor([[1.0, 2.0], [0.0, 0.5]], dtype=torch.float64)
    result = audit.translation_invariance(lambda z: torch.where(z > 100, math.nan, z), logits,
                                          torch.Generator().manual_seed(0))
    assert result["max_abs_diff"] == math.inf and not result["holds"]


# --------------------------------------------------------------------------------------------- decisions
def test_decision_counts_on_handmade_voxels():
    nan = math.nan
    logits = torch.tensor([
        # v0      v1    v2 (top tie)  v3 (all tie)  v4     v5     v6
        [2.0,    1.0,   1.0,          0.0,          3.0,   3.0,   3.0],
        [1.0,    2.0,   1.0,          0.0,          2.0,   2.0,   2.0],
        [0.0,    0.0,   0.0,          0.0,          1.0,   1.0,   1.0],
    ], dtype=torch.float64)
    calibrated = torch.tensor([
        [1.0,    1.0,   0.0,          5.0,          1.0,   3.0,   nan],
        [2.0,    2.0,   9.0,          0.0,          1.0,   0.0,   0.0],
        [0.0,    0.0,   0.0,          0.0,          0.0,   1.0,   0.0],
    ], dtype=torch.float64)
    out = audit.decision_preservation(logits, calibrated)
    assert out["voxels"] == 7
    assert out["argmax_voxels"] == 5  # v2, v3: exact input ties have no decision to keep
    assert out["flips"] == 2  # v0 (class 1 strictly above 0), v6 (NaN)
    assert out["argmax_ties_created"] == 1  # v4: a tie is not a flip
    assert out["flip_rate"] == pytest.approx(2 / 5)
    assert out["order_voxels"] == 5
    assert out["order_changes"] == 3  # v0, v5 (classes 1 and 2 swapped), v6
    assert out["order_ties_created"] == 1  # v4
    assert out["order_change_rate"] == pytest.approx(3 / 5)


def test_rates_are_none_without_decisive_voxels():
    ties = torch.zeros(3, 4, dtype=torch.float64)
    out = audit.decision_preservation(ties, ties)
    assert out["argmax_voxels"] == 0 and out["flip_rate"] is None and out["order_change_rate"] is None


def test_adversarial_logits_cover_wide_magnitudes_near_ties_and_float16():
    n, C = 4000, 5
    z = audit.adversarial_logits(C, n, torch.Generator().manual_seed(1))
    assert z.shape == (C, n) and z.dtype == torch.float64 and bool(torch.isfinite(z).all())
    quarter = n // 4
    wide = z[:, :quarter]
    spread = (wide.max(0).values - wide.min(0).values)
    assert float(spread.max()) > 1e3 and float(spread.min()) < 1.0  # magnitudes from ~0.01 to ~1e4
    top2 = z[:, quarter:2 * quarter].sort(0, descending=True).values
    gaps = top2[0] - top2[1]
    assert float(gaps.max()) <= 1e-3 + 1e-9 and float(gaps.min()) > 0
    assert int((gaps < 1e-5).sum()) > quarter // 10
    ranking = z[:, 2 * quarter:3 * quarter].sort(0, descending=True).values
    consecutive = ranking[:-1] - ranking[1:]
    assert float(consecutive.max()) <= 1e-3 + 1e-9 and float(consecutive.min()) > 0
    half = z[:, 3 * quarter:]
    assert torch.equal(half, half.to(torch.float16).to(torch.float64))
    ordered = half.sort(0, descending=True).values
    assert int((ordered[0] == ordered[1]).sum()) > 0  # exact ties exist, and are excluded from the counts
    again = audit.adversarial_logits(C, n, torch.Generator().manual_seed(1))
    assert torch.equal(z, again)


# --------------------------------------------------------------------------------------------- families
@pytest.mark.parametrize("name", list(METHODS))
def test_every_family_with_random_parameters_measures_as_theory_says(name, small_sets):
    cls = get_method(name)
    result = audit.audit_family(cls, 4, small_sets, draws=2, seed=5)
    assert as_tuple(result["measured"]) == THEORY[name]
    assert as_tuple(cls.properties.as_dict()) == THEORY[name]
    if THEORY[name][0]:
        assert result["translation_invariance"]["max_abs_diff"] < 1e-11  # four orders below the tolerance
    else:
        assert result["translation_invariance"]["max_abs_diff"] > 0.5  # drifts to collapse at ±1e3
        assert result["drift"]["max_change"] > 0.5
    entry = audit.evaluate_entry({"name": name, **result}, required=())
    assert not entry["failed"]
    # two draws merged: per-set worst case for TI, summed counts for decisions, every draw kept
    assert set(result["translation_invariance"]["sets"]) == {"random", "adversarial"}
    assert result["decisions"]["sets"]["adversarial"]["voxels"] == 2 * 3000
    assert len(result["decisions"]["draws"]) == len(result["translation_invariance"]["draws"]) == 2


@pytest.fixture(scope="module")
def fitted():
    from segcal_cli.fitting.driver import fit_tensors
    from segcal_cli.synthetic import make_case

    case = make_case((16, 16), 4, seed=0)
    z = torch.from_numpy(case.logits).reshape(4, -1)
    y = torch.from_numpy(case.labels).reshape(-1).long()
    cals = {}
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name in METHODS:
            cals[name] = fit_tensors(name, z, y, max_iter=15).calibrator
    finally:
        torch.set_num_threads(previous)
    return cals, z.to(torch.float64)


@pytest.mark.parametrize("name", list(METHODS))
def test_fitted_calibrators_keep_what_they_declare(name, fitted):
    cals, data = fitted
    cal = cals[name]
    sets = audit.build_sets(4, seed=0, random_voxels=0, adversarial_voxels=2000, data_sample=data)
    result = audit.audit_calibrator(cal, sets, type(cal).properties.as_dict())
    measured = result["measured"]
    assert measured["translation_invariant"] == THEORY[name][0]
    for prop, guaranteed in zip(audit.PROPERTY_NAMES, THEORY[name]):
        if guaranteed:
            assert measured[prop], prop
    assert not audit.evaluate_entry({"name": name, **result}, ())["failed"]


def test_shift_sensitive_families_become_ti_at_their_constraint():
    # ms-ti is ms with equal row sums; vs with equal weights is ts: both measured TI
    sets = audit.build_sets(3, seed=0, random_voxels=500, adversarial_voxels=500)
    vs = get_method("vs").from_parameters(3, {"weight": [1.5, 1.5, 1.5], "bias": [0.1, -0.4, 0.2]})
    assert audit.audit_calibrator(vs, sets, None)["measured"]["translation_invariant"]
    ms_ti = get_method("ms-ti").random(3, torch.Generator().manual_seed(2))
    as_ms = get_method("ms").from_parameters(3, ms_ti.parameters())
    assert audit.audit_calibrator(as_ms, sets, None)["translation_invariance"]["max_abs_diff"] < 1e-9


# --------------------------------------------------------------------------------------------- verdicts
def test_verdict_rows():
    declared = {"translation_invariant": True, "argmax_preserving": True, "order_preserving": False}
    measured = {"translation_invariant": True, "argmax_preserving": False, "order_preserving": False}
    rows = {r["short"]: r for r in audit.verdicts(declared, measured, required=["order_preserving"])}
    assert rows["ti"]["verdict"] == "holds" and not rows["ti"]["failed"]
    assert rows["argmax"]["verdict"].startswith("VIOLATED") and rows["argmax"]["failed"]
    assert rows["order"]["verdict"].startswith("FAILS") and rows["order"]["failed"]
    relaxed = {r["short"]: r for r in audit.verdicts({k: False for k in declared}, {k: True for k in declared})}
    assert all(not r["failed"] and r["verdict"] == "holds (not declared)" for r in relaxed.values())


def test_parse_require():
    assert audit.parse_require("ti, argmax,order,ti") == ["translation_invariant", "argmax_preserving",
                                                          "order_preserving"]
    assert audit.parse_require(None) == [] and audit.parse_require("") == []
    with pytest.raises(InputError, match="unknown property 'calibrated'"):
        audit.parse_require("ti,calibrated")


def test_class_count_mismatch_is_input_error(small_sets):
    with pytest.raises(InputError, match="3 classes"):
        audit.audit_calibrator(get_method("ts").identity(3), small_sets, None)


# --------------------------------------------------------------------------------------------- artifacts
def _artifact(tmp_path, name, method, classes=3, suffix=".json", **edit):
    path = tmp_path / f"{name}{suffix}"
    save_artifact(get_method(method).random(classes, torch.Generator().manual_seed(0)), path, {"seed": 0})
    if edit and suffix == ".json":
        payload = json.loads(path.read_text())
        payload["properties"].update(edit)
        path.write_text(json.dumps(payload))
    elif edit:
        payload = torch.load(path, weights_only=True)
        payload["properties"].update(edit)
        torch.save(payload, path)
    return path


@pytest.mark.parametrize("suffix", [".json", ".pt"])
def test_load_for_audit_keeps_what_the_file_declares(tmp_path, suffix):
    path = _artifact(tmp_path, "ms_tampered", "ms", suffix=suffix, argmax_preserving=True)
    cal, info, declared = audit.load_for_audit(path)
    assert cal.name == "ms" and info["path"] == str(path)
    assert declared == {"translation_invariant": False, "argmax_preserving": True, "order_preserving": False}
    sets = audit.build_sets(3, seed=0, random_voxels=500, adversarial_voxels=1000)
    entry = audit.evaluate_entry({"name": str(path), **audit.audit_calibrator(cal, sets, declared)}, ())
    assert entry["failed"] and entry["failures"] == [f"{path}: argmax_preserving VIOLATED (declared)"]


def test_load_for_audit_of_an_honest_file(tmp_path):
    path = _artifact(tmp_path, "ts", "ts")
    cal, _, declared = audit.load_for_audit(path, expect_classes=3)
    assert declared == get_method("ts").properties.as_dict()


@pytest.mark.parametrize("mutate, message", [
    (lambda p: p["properties"].update(argmax_preserving="yes"), "must be true or false"),
    (lambda p: p.update(properties=[1, 2]), "must be a mapping"),
    (lambda p: p["parameters"].update(weight=[[1.0]]), "shape"),
])
def test_load_for_audit_rejects_bad_files(tmp_path, mutate, message):
    path = _artifact(tmp_path, "vs", "vs", argmax_preserving=True)
    payload = json.loads(path.read_text())
    mutate(payload)
    path.write_text(json.dumps(payload))
    with pytest.raises(InputError, match=message) as err:
        audit.load_for_audit(path)
    assert str(path) in str(err.value) and "segcal-audit-" not in str(err.value)


def test_load_for_audit_of_a_corrupt_file(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"format": "segcal.calibrator", "sche')
    with pytest.raises(InputError, match="broken.json"):
        audit.load_for_audit(path)


# --------------------------------------------------------------------------------------------- sampling
def _h5(tmp_path, name="data.h5"):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 3, 10, 12)).astype(np.float32)
    labels = rng.integers(0, 3, size=(2, 10, 12)).astype(np.uint8)
    labels[0, :3] = 255
    path = tmp_path / name
    with h5py.File(path, "w") as f:
        f.create_dataset("logits", data=logits, chunks=(1, 3, 5, 6))
        f.create_dataset("labels", data=labels, chunks=(1, 5, 6))
    return path, logits, labels


def test_voxel_sample_is_reproducible_valid_and_independent_of_block_size(tmp_path):
    path, logits, labels = _h5(tmp_path)
    valid_columns = {tuple(col) for case in range(2)
                     for col in logits[case].reshape(3, -1).T[labels[case].reshape(-1) != 255].tolist()}
    samples = []
    for chunk in (None, 16, 7):
        with open_dataset([str(path)], DataOptions(device="cpu", chunk_voxels=chunk)) as ds:
            samples.append(audit.sample_voxels(ds, 50, seed=4))
    assert samples[0].shape == (3, 50) and samples[0].dtype == torch.float64
    assert torch.equal(samples[0], samples[1]) and torch.equal(samples[0], samples[2])
    assert {tuple(c) for c in samples[0].T.float().tolist()} <= valid_columns
    with open_dataset([str(path)], DataOptions(device="cpu")) as ds:
        other = audit.sample_voxels(ds, 50, seed=5)
        everything = audit.sample_voxels(ds, 10_000, seed=4)
    assert not torch.equal(other, samples[0])
    assert everything.shape[1] == len(valid_columns) == 2 * 120 - 36


def test_all_ignored_data_is_input_error(tmp_path):
    path = tmp_path / "ignored.h5"
    with h5py.File(path, "w") as f:
        f["logits"] = np.zeros((3, 4, 4), np.float32)
        f["labels"] = np.full((4, 4), 255, np.uint8)
    with open_dataset([str(path)], DataOptions(device="cpu")) as ds:
        with pytest.raises(InputError, match="no valid voxels"):
            audit.sample_voxels(ds, 10, seed=0)
