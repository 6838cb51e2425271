"""The fused numba kernel (metrics/fused.py) against the eager torch path: its exp and log, per-voxel bins on
edge-heavy data, every accumulated sum, independence from block cuts, the calibrator path, and the switches
that send work to the eager path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from segcal_cli.metrics import adaptive, fused
from segcal_cli.metrics.binning import Binner, bin_edges
from segcal_cli.metrics.evaluation import Evaluation
from segcal_cli.metrics.state import MetricState
from segcal_cli.metrics.voxels import voxel_stats

pytestmark = pytest.mark.skipif(fused.unavailable_reason() is not None,
                                reason=f"fused kernel unavailable: {fused.unavailable_reason()}")

@pytest.fixture(autouse=True)
def _fused_on(monkeypatch):
    """The tests' data is far below the size from which `evaluate` uses the kernel by default."""
    monkeypatch.setenv("SEGCAL_FUSED", "1")


FUSED_METRICS = ("ece", "mce", "ace", "adaptive_ece", "nll", "brier", "accuracy", "dice", "iou")


def _ulp_error(got: np.ndarray, exact: np.ndarray) -> np.ndarray:
    """|got - exact| in units of the float32 spacing at the correctly rounded result."""
    return np.abs(got.astype(np.float64) - exact) / np.spacing(exact.astype(np.float32)).astype(np.float64)


def test_exp_within_two_ulp_of_float64_exp_and_exact_at_zero():
    rng = np.random.default_rng(0)
    x = np.concatenate([np.linspace(-87.0, 0.0, 2_000_001, dtype=np.float32),
                        -rng.random(1_000_000).astype(np.float32) * 87,
                        -rng.random(100_000).astype(np.float32) * 1e-3,  # around the top class
                        np.array([0.0, -0.0, -1e-30, -np.float32(2.0) ** -24], np.float32)])
    out = np.empty_like(x)
    fused.exp_array(x, out)
    err = _ulp_error(out, np.exp(x.astype(np.float64)))
    assert err.max() <= 2.0, err.max()
    assert out[x == 0].tolist() == [1.0] * int((x == 0).sum())  # the top class contributes exactly 1
    # below -87: a tiny normal value (never a denormal), and nothing below it
    low = np.array([-87.0001, -88.0, -100.0, -1e4, -3e38, -np.inf], np.float32)
    low_out = np.empty_like(low)
    fused.exp_array(low, low_out)
    assert np.all(low_out >= np.finfo(np.float32).tiny) and np.all(low_out <= np.exp(-86.9))


def test_log_within_two_ulp_of_float64_log():
    x = np.concatenate([np.linspace(1.0, 2.0, 1_000_001, dtype=np.float32),
                        np.geomspace(1.0, 1e6, 1_000_001).astype(np.float32)])
    out = np.empty_like(x)
    fused.log_array(x, out)
    exact = np.log(x.astype(np.float64))
    nonzero = exact > 0
    assert _ulp_error(out[nonzero], exact[nonzero]).max() <= 2.0
    assert np.abs(out[~nonzero]).max() == 0.0  # log 1 = 0 exactly (a voxel whose other classes underflow)


def _logits(seed: int, C: int, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """float32 logits with the hard cases: ties, very confident voxels (other classes underflow), exact
    2- and 3-way ties at the top (confidence 1/2, 1/3), and invalid voxels."""
    rng = np.random.default_rng(seed)
    z = (rng.normal(size=(C, n)) * 3).astype(np.float32)
    q = n // 8
    z[:, :q] *= 40  # confidences of exactly 1.0
    z[:, q:2 * q] = np.round(z[:, q:2 * q] / 3)  # many tied logits
    z[:, 2 * q:3 * q] = -5.0
    z[0, 2 * q:3 * q] = 2.0
    if C >= 2:
        z[1, 2 * q:int(2.5 * q)] = 2.0  # top tie of two (and of three below): conf exactly 1/2, 1/3 for C = 2, 3
    if C >= 3:
        z[2, int(2.5 * q):3 * q] = 2.0
        z[1, int(2.5 * q):3 * q] = 2.0
    y = rng.integers(0, C, n)
    valid = rng.random(n) > 0.15
    return z, y, valid


def _eager_state(z, y, valid, bins, rule, metrics=FUSED_METRICS) -> MetricState:
    state = MetricState(z.shape[0], bins, rule, metrics=metrics)
    state.update(torch.from_numpy(z), torch.from_numpy(y), torch.from_numpy(valid))
    return state


def _fused_state(z, y, valid, bins, rule, metrics=FUSED_METRICS, cuts=None) -> MetricState:
    state = MetricState(z.shape[0], bins, rule, metrics=metrics)
    acc = fused.FusedAccumulator.create(state)
    assert acc is not None
    n = y.shape[0]
    bounds = [0] + list(cuts or []) + [n]
    for a, b in zip(bounds[:-1], bounds[1:]):
        acc.add(state, torch.from_numpy(z[:, a:b]), torch.from_numpy(y[a:b]), torch.from_numpy(valid[a:b]))
    return state


def _near_edge(conf: np.ndarray, bins: int, ulps: int = 4) -> np.ndarray:
    """Voxels whose confidence lies within `ulps` float32 spacings of a bin edge (where a 1-ulp difference
    between two exp implementations may move them across)."""
    edges = bin_edges(bins).double().numpy()
    gap = np.abs(conf.astype(np.float64)[:, None] - edges[None, :]).min(1)
    return gap <= ulps * np.spacing(np.float32(1.0))


@pytest.mark.parametrize("C", [2, 3, 5, 19, 100])
@pytest.mark.parametrize("rule", ["right", "left", "torchmetrics"])
@pytest.mark.parametrize("bins", [1, 2, 15])
def test_fused_sums_equal_the_eager_ones(C, rule, bins):
    n = 4099  # odd, several tiles, a partial last tile
    z, y, valid = _logits(C * 7 + bins, C, n)
    eager = _eager_state(z, y, valid, bins, rule)
    got = _fused_state(z, y, valid, bins, rule)
    assert int(got.voxels) == int(eager.voxels) == int(valid.sum())
    assert torch.equal(got.confusion, eager.confusion)  # predictions: exact, lowest class on ties
    stats = voxel_stats(torch.from_numpy(z), torch.from_numpy(y), nll=False, brier=False, probs=False)
    near = _near_edge(stats.conf.numpy(), bins)[valid]
    moved = int((got.bin_count - eager.bin_count).abs().sum())
    assert moved <= 2 * int(near.sum()), (moved, int(near.sum()))
    np.testing.assert_allclose(got.bin_conf.numpy(), eager.bin_conf.numpy(), rtol=1e-6,
                               atol=1e-6 * (1 + int(near.sum())))
    assert float(got.nll_sum) == pytest.approx(float(eager.nll_sum), rel=1e-6)
    assert float(got.brier_sum) == pytest.approx(float(eager.brier_sum), rel=1e-6)
    a, b = got.compute(), eager.compute()
    assert a["accuracy"] == b["accuracy"] and a["dice"] == b["dice"] and a["iou"] == b["iou"]
    for name in ("ece", "adaptive_ece", "nll", "brier"):
        assert a[name] == pytest.approx(b[name], rel=1e-5, abs=1e-6), name


@pytest.mark.parametrize("rule", ["right", "left", "torchmetrics"])
@pytest.mark.parametrize("bins", [1, 2, 3, 15, 100])
def test_every_voxel_is_binned_as_binner_index_does(rule, bins):
    """Voxel by voxel (one kernel call each): the kernel's bin equals Binner.index of the eager confidence
    whenever that confidence is not within 4 ulp of an edge; exact 1/2, 1/3 and 1.0 confidences (ties, and
    voxels whose other classes underflow) land exactly as the eager path puts them."""
    C, n = 3, 1200
    z, y, _ = _logits(bins, C, n)
    valid = np.ones(n, bool)
    stats = voxel_stats(torch.from_numpy(z), torch.from_numpy(y), nll=False, brier=False, probs=False)
    expected = Binner(bins, rule).index(stats.conf).numpy()
    near = _near_edge(stats.conf.numpy(), bins)
    exact_conf = np.isin(stats.conf.numpy(), np.float32([1.0, 0.5, 1 / 3]))
    state = MetricState(C, bins, rule, metrics=("ece",))
    acc = fused.FusedAccumulator.create(state)
    got = np.empty(n, np.int64)
    for i in range(n):
        before = state.bin_count.clone()
        acc.add(state, torch.from_numpy(z[:, i:i + 1]), torch.from_numpy(y[i:i + 1]), torch.from_numpy(valid[i:i + 1]))
        got[i] = int(torch.nonzero(state.bin_count - before)[0, 0]) // 2
    assert exact_conf.sum() > n // 8
    check = ~near | exact_conf
    np.testing.assert_array_equal(got[check], expected[check])


def test_conf_is_exactly_one_when_the_other_classes_underflow():
    # voxels (columns): margins 40 and 50 (the others underflow: conf exactly 1.0), then margin 3 (conf < 1)
    z = np.array([[0.0, 50.0, 3.0], [-40.0, 0.0, 0.0], [-100.0, -1e30, 0.0]], np.float32)
    y = np.zeros(3, np.int64)
    state = _fused_state(z, y, np.ones(3, bool), 15, "torchmetrics")
    counts = state.bin_count.view(-1, 2).sum(1)
    assert int(counts[15]) == 2  # the bin of exactly 1.0
    assert float(state.bin_conf[15]) == 2.0


def test_results_do_not_depend_on_where_blocks_are_cut():
    z, y, valid = _logits(5, 19, 10_007)
    one = _fused_state(z, y, valid, 15, "right")
    for cuts in ([1, 2, 3, 1000, 1023, 1024, 1025, 5000], [4999], list(range(37, 10_007, 997))):
        cut = _fused_state(z, y, valid, 15, "right", cuts=cuts)
        for name in ("bin_count", "confusion", "fine_count", "voxels"):
            assert torch.equal(getattr(cut, name), getattr(one, name)), name
        for name in ("bin_conf", "fine_conf", "nll_sum", "brier_sum"):
            np.testing.assert_allclose(getattr(cut, name).numpy(), getattr(one, name).numpy(), rtol=1e-13)
        assert torch.equal(cut.fine_min, one.fine_min) and torch.equal(cut.fine_max, one.fine_max)


def test_adaptive_buckets_equal_the_eager_ones_away_from_bucket_boundaries():
    z, y, valid = _logits(9, 6, 5000)
    got = _fused_state(z, y, valid, 15, "right", metrics=("adaptive_ece",))
    eager = _eager_state(z, y, valid, 15, "right", metrics=("adaptive_ece",))
    moved = int((got.fine_count - eager.fine_count).abs().sum())
    assert moved <= 20, moved  # only voxels whose confidence differs by an ulp across a bucket boundary
    a, b = got.compute(), eager.compute()
    assert a["adaptive_ece"] == pytest.approx(b["adaptive_ece"], rel=1e-4, abs=1e-6)


def _evaluate(z, y, valid, metrics, calibrate=None, block=3000, dtype=torch.float32, sub_block=None):
    n = y.shape[0]
    ev = Evaluation(z.shape[0], ["c"], [n], metrics=metrics, calibrate=calibrate, sub_block_voxels=sub_block)
    with torch.inference_mode():
        for a in range(0, n, block):
            ev.add_block(0, torch.from_numpy(z[:, a:a + block]).to(dtype), torch.from_numpy(y[a:a + block]),
                         torch.from_numpy(valid[a:a + block]))
    return ev, ev.finish()


def _close(a: dict, b: dict, rel=1e-5):
    assert set(a) == set(b)
    for key, value in a.items():
        if isinstance(value, list):
            assert value == b[key], key
        else:
            assert value == pytest.approx(b[key], rel=rel, abs=1e-6), key


def test_env_var_forces_the_eager_path_with_the_same_results(monkeypatch):
    z, y, valid = _logits(1, 5, 9000)
    ev, fused_result = _evaluate(z, y, valid, FUSED_METRICS)
    assert ev.fused and ev.fused_unavailable is None
    monkeypatch.setenv("SEGCAL_FUSED", "0")
    ev, eager_result = _evaluate(z, y, valid, FUSED_METRICS)
    assert not ev.fused and ev.fused_unavailable is None
    _close(fused_result.uncalibrated["pooled"], eager_result.uncalibrated["pooled"])


def test_float64_blocks_take_the_eager_path(monkeypatch):
    z, y, valid = _logits(2, 4, 5000)

    def refuse(*args, **kwargs):
        raise AssertionError("the fused kernel must not see this block")

    _, fused_result = _evaluate(z, y, valid, FUSED_METRICS)
    monkeypatch.setattr(fused.FusedAccumulator, "add", refuse)
    ev, result = _evaluate(z.astype(np.float64), y, valid, FUSED_METRICS, dtype=torch.float64)
    assert ev.fused  # configured, but float64 blocks go elsewhere
    a, b = result.uncalibrated["pooled"], fused_result.uncalibrated["pooled"]
    assert a["dice"] == b["dice"] and a["accuracy"] == b["accuracy"]
    for name in ("ece", "adaptive_ece", "nll", "brier"):  # float64 vs float32 statistics
        assert a[name] == pytest.approx(b[name], rel=1e-5, abs=1e-4), name


def test_default_uses_the_kernel_from_a_size_on(monkeypatch):
    monkeypatch.delenv("SEGCAL_FUSED")
    from segcal_cli.kernel_choice import MIN_VALUES

    small = Evaluation(19, ["c"], [MIN_VALUES // 19 - 1], metrics=FUSED_METRICS)
    large = Evaluation(19, ["c"], [MIN_VALUES // 19 + 1], metrics=FUSED_METRICS)
    assert not small.fused and small.fused_unavailable is None
    assert large.fused


def test_compile_flag_selects_the_torch_compile_path_instead():
    z, y, valid = _logits(2, 4, 100)
    ev = Evaluation(4, ["c"], [100], metrics=FUSED_METRICS, compile=True)
    assert not ev.fused and ev._compiled is not None  # compiled lazily, on the first block (not here)


def test_classwise_and_boundary_sums_come_from_eager_statistics_beside_the_kernel(monkeypatch):
    """Every metric but classwise ECE and BA-ECE comes from the kernel whatever is selected, so a full run and a
    selective one agree exactly; classwise ECE and BA-ECE agree with the all-eager path."""
    from segcal_cli.metrics.boundary import boundary_distance

    z, y, valid = _logits(8, 5, 64 * 64)
    dist = torch.from_numpy(boundary_distance(y.reshape(64, 64)).reshape(-1))

    def run(metrics, boundary=False):
        ev = Evaluation(5, ["c"], [y.size], metrics=metrics, boundary=boundary, sub_block_voxels=1000)
        with torch.inference_mode():
            for a in range(0, y.size, 1500):
                ev.add_block(0, torch.from_numpy(z[:, a:a + 1500]), torch.from_numpy(y[a:a + 1500]),
                             torch.from_numpy(valid[a:a + 1500]), dist[a:a + 1500] if boundary else None)
        return ev, ev.finish().uncalibrated["pooled"]

    ev, everything = run(None, boundary=True)
    assert ev.fused
    _, some = run(("ece", "nll", "dice"))
    for key, value in some.items():
        assert value == everything[key], key  # exactly: the same kernel, the same blocks
    monkeypatch.setenv("SEGCAL_FUSED", "0")
    _, eager = run(None, boundary=True)
    _close(everything, eager)
    assert everything["ba_ece"] == pytest.approx(eager["ba_ece"], rel=1e-5)


def test_calibrated_path_and_preservation_equal_the_eager_ones(monkeypatch):
    z, y, valid = _logits(4, 6, 7001)

    def calibrate(logits):  # changes some argmaxes and rankings: per-class temperature and bias
        scale = torch.linspace(0.5, 1.5, logits.shape[0], dtype=logits.dtype).unsqueeze(1)
        return logits * scale + torch.arange(logits.shape[0], dtype=logits.dtype).unsqueeze(1) * 0.3

    ev, got = _evaluate(z, y, valid, FUSED_METRICS, calibrate=calibrate, sub_block=1000)
    assert ev.fused
    monkeypatch.setenv("SEGCAL_FUSED", "0")
    _, eager = _evaluate(z, y, valid, FUSED_METRICS, calibrate=calibrate, sub_block=1000)
    assert 0 < eager.preservation["flips"] < int(valid.sum())
    for key in ("flips", "harmful_flips", "beneficial_flips", "neutral_flips", "order_changes"):
        assert got.preservation[key] == eager.preservation[key], key
    _close(got.calibrated["pooled"], eager.calibrated["pooled"])
    _close(got.uncalibrated["pooled"], eager.uncalibrated["pooled"])


def test_a_calibrator_returning_float64_is_scored_eagerly_after_the_fused_uncalibrated_pass():
    z, y, valid = _logits(6, 3, 3000)
    ev, got = _evaluate(z, y, valid, FUSED_METRICS, calibrate=lambda t: t.double() / 2)
    assert ev.fused
    assert got.preservation["flips"] == 0 and got.calibrated["pooled"]["dice"] == got.uncalibrated["pooled"]["dice"]


def test_label_outside_the_classes_is_an_error_not_a_crash():
    z, y, valid = _logits(3, 4, 100)
    y[50] = 4
    state = MetricState(4, metrics=("ece",))
    acc = fused.FusedAccumulator.create(state)
    with pytest.raises(ValueError, match="label 4"):
        acc.add(state, torch.from_numpy(z), torch.from_numpy(y), None)
    valid[50] = False  # an invalid voxel's label is never read
    state = MetricState(4, metrics=("ece",))
    acc.add(state, torch.from_numpy(z), torch.from_numpy(y), torch.from_numpy(valid))
    assert int(state.voxels) == int(valid.sum())


def test_kernel_releases_the_gil_and_starts_no_threads():
    options = fused.accumulate.targetoptions
    assert options.get("nogil") is True and not options.get("parallel")
    assert adaptive.NUM_BUCKETS > 0  # the buckets the kernel indexes are the module's


@pytest.mark.parametrize("data", ["street_test.h5", "brain_test.zarr"])
def test_evaluate_command_gives_the_eager_numbers_through_the_kernel(data, tmp_path, monkeypatch):
    """`segcal evaluate` end to end (calibrator, per case, all metrics and a selection) with and without the
    kernel: identical counts and Dice, flips, order changes; other metrics within float32 rounding."""
    import json
    from pathlib import Path

    from typer.testing import CliRunner

    from segcal_cli.cli import app

    root = Path(__file__).resolve().parents[1] / "sample_data"
    runner = CliRunner()
    cal = tmp_path / "ts.json"
    fit = runner.invoke(app, ["fit", str(root / data), "--method", "ts", "-o", str(cal), "--quiet"])
    assert fit.exit_code == 0, fit.output

    calls = []
    original = fused.FusedAccumulator.add
    monkeypatch.setattr(fused.FusedAccumulator, "add", lambda *a, **k: calls.append(1) or original(*a, **k))

    def evaluate(flag, *extra):
        monkeypatch.setenv("SEGCAL_FUSED", flag)
        out = tmp_path / f"r{flag}.json"
        res = runner.invoke(app, ["evaluate", str(root / data), "--calibrator", str(cal), "--per-case", "--quiet",
                                  "--json", str(out), *extra])
        assert res.exit_code == 0, res.output
        return json.loads(out.read_text())

    for extra in ((), ("--metrics", "ece,nll,brier,dice,adaptive_ece")):
        calls.clear()
        got = evaluate("1", *extra)
        assert calls  # the kernel did the work
        eager = evaluate("0", *extra)
        for side in ("uncalibrated", "calibrated"):
            _close(got[side]["pooled"], eager[side]["pooled"])
            for a, b in zip(got["per_case"], eager["per_case"]):
                _close({k: v for k, v in (a if side == "calibrated" else a["uncalibrated"]).items()
                        if k not in ("id", "voxels", "uncalibrated", "preservation")},
                       {k: v for k, v in (b if side == "calibrated" else b["uncalibrated"]).items()
                        if k not in ("id", "voxels", "uncalibrated", "preservation")})
            assert [r["count"] for r in got["reliability"][side]] == [r["count"] for r in eager["reliability"][side]]
        for key in ("flips", "harmful_flips", "beneficial_flips", "neutral_flips", "order_changes"):
            assert got["preservation"][key] == eager["preservation"][key], key


def test_float16_blocks_give_exactly_the_float32_results(monkeypatch):
    """A stream with keep_float16 hands the kernel float16 logits as stored: it reads their bits and converts
    them a tile at a time, so the sums equal those of the same values given as float32, bit for bit; the
    calibrator and eager paths get float32 too."""
    monkeypatch.setenv("SEGCAL_FUSED", "1")
    z, y, valid = _logits(11, 19, 6001)
    z16 = z.astype(np.float16)
    z32 = z16.astype(np.float32)
    half = _fused_state(z16, y, valid, 15, "right", cuts=[1000, 1025, 4000])
    single = _fused_state(z32, y, valid, 15, "right", cuts=[1000, 1025, 4000])
    for name in ("bin_count", "confusion", "fine_count", "voxels", "bin_conf", "fine_conf", "nll_sum", "brier_sum"):
        assert torch.equal(getattr(half, name), getattr(single, name)), name

    def calibrate(logits):
        assert logits.dtype == torch.float32
        return logits * 0.7

    _, got = _evaluate(z32, y, valid, FUSED_METRICS + ("classwise_ece",), calibrate=calibrate, dtype=torch.float16)
    _, expected = _evaluate(z32, y, valid, FUSED_METRICS + ("classwise_ece",), calibrate=calibrate)
    assert got.uncalibrated == expected.uncalibrated and got.calibrated == expected.calibrated
    monkeypatch.setenv("SEGCAL_FUSED", "0")  # the eager path scores float16 blocks in float32 too
    _, eager16 = _evaluate(z32, y, valid, FUSED_METRICS, dtype=torch.float16)
    _, eager32 = _evaluate(z32, y, valid, FUSED_METRICS)
    assert eager16.uncalibrated == eager32.uncalibrated
