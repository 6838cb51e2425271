"""Metric accumulators against independent plain-numpy computations, peers (fiducio, torchmetrics), a known
true posterior, and chunking / merge-order invariance."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from segcal_cli.metrics.adaptive import NUM_BUCKETS, fine_bucket
from segcal_cli.metrics.binning import Binner
from segcal_cli.metrics.boundary import boundary_distance
from segcal_cli.metrics.evaluation import Evaluation
from segcal_cli.metrics.state import MetricState

REL = 1e-9


def _edges(bins):
    return torch.linspace(0, 1, bins + 1, dtype=torch.float32).double().numpy()


def _bin_index(values, bins, rule):
    """The rules of theory.md §6, written with numpy searchsorted."""
    inner = _edges(bins)[1:-1]
    if rule == "right":
        return np.searchsorted(inner, values, side="left")
    idx = np.searchsorted(inner, values, side="right")
    if rule == "torchmetrics":
        idx = np.where(values >= 1.0, bins, idx)
    return idx


def reference_metrics(z, y, valid, bins, rule, dist=None):
    """Plain float64 numpy: softmax, binning, every metric."""
    z = z[:, valid]
    y = y[valid]
    C, n = z.shape
    p = np.exp(z - z.max(0))
    p /= p.sum(0)
    pred = np.argmax(p, axis=0)
    conf = p.max(0)
    correct = (pred == y).astype(np.float64)
    nb = bins + 1 if rule == "torchmetrics" else bins
    idx = _bin_index(conf, bins, rule)
    gaps, weights = [], []
    for b in range(nb):
        sel = idx == b
        if sel.any():
            gaps.append(abs(correct[sel].mean() - conf[sel].mean()))
            weights.append(sel.sum() / n)
    gaps = np.array(gaps)
    out = {"ece": float((gaps * np.array(weights)).sum()), "mce": float(gaps.max()), "ace": float(gaps.mean())}
    cw = []
    for k in range(C):
        kidx = _bin_index(p[k], bins, rule)
        total = 0.0
        for b in range(nb):
            sel = kidx == b
            if sel.any():
                total += sel.sum() / n * abs((y[sel] == k).mean() - p[k, sel].mean())
        cw.append(total)
    out["classwise_ece"] = float(np.mean(cw))
    out["nll"] = float(np.mean(-np.log(p[y, np.arange(n)])))
    onehot = np.eye(C)[y].T
    out["brier"] = float(np.mean(((p - onehot) ** 2).sum(0)))
    out["accuracy"] = float(correct.mean())
    dice, iou = [], []
    for k in range(C):
        tp = np.sum((pred == k) & (y == k))
        fp = np.sum((pred == k) & (y != k))
        fn = np.sum((pred != k) & (y == k))
        dice.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else np.nan)
        iou.append(tp / (tp + fp + fn) if tp + fp + fn else np.nan)
    out["dice"], out["iou"] = dice, iou
    out["dice_mean"] = float(np.nanmean(dice))
    out["iou_mean"] = float(np.nanmean(iou))
    # equal-mass bins by sorting (n is a multiple of bins in the tests; random data has no ties)
    order = np.argsort(conf, kind="stable")
    parts = np.array_split(order, bins)
    out["adaptive_ece"] = float(sum(len(s) / n * abs(correct[s].mean() - conf[s].mean()) for s in parts))
    if dist is not None:
        d = dist[valid]
        band = np.digitize(d, [3, 7, 15])
        num, den = 0.0, 0.0
        for b in range(4):
            sel = band == b
            if sel.any():
                w = 1 / (d[sel].mean() + 1)
                num += w * abs(np.mean(1 - conf[sel]) - np.mean(1 - correct[sel]))
                den += w
        out["ba_ece"] = num / den
    return out


def _random_block(seed, C=6, n=3000, scale=3.0, invalid=0.1):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(C, n)) * scale
    z[:, : n // 10] *= 8  # confident voxels (conf -> 1.0)
    y = rng.integers(0, C, size=n)
    y[: n // 10] = z[:, : n // 10].argmax(0)
    valid = rng.random(n) >= invalid
    dist = rng.random(n) * 30
    return z, y, valid, dist


def _compute(z, y, valid, bins, rule, dist=None, dtype=torch.float64):
    state = MetricState(z.shape[0], bins, rule, boundary=dist is not None)
    state.update(torch.from_numpy(z).to(dtype), torch.from_numpy(y), torch.from_numpy(valid),
                 None if dist is None else torch.from_numpy(dist))
    return state


@pytest.mark.parametrize("rule", ["right", "left", "torchmetrics"])
@pytest.mark.parametrize("bins", [1, 10, 15])
def test_every_metric_equals_numpy(rule, bins):
    z, y, valid, dist = _random_block(bins)
    got = _compute(z, y, valid, bins, rule, dist).compute()
    ref = reference_metrics(z, y, valid, bins, rule, dist)
    for name in ("ece", "mce", "ace", "classwise_ece", "nll", "brier", "accuracy", "dice_mean", "iou_mean", "ba_ece"):
        assert got[name] == pytest.approx(ref[name], rel=REL, abs=1e-15), name
    np.testing.assert_allclose(got["dice"], ref["dice"], rtol=REL)
    np.testing.assert_allclose(got["iou"], ref["iou"], rtol=REL)
    # adaptive ECE: within its stated bound of the sort-based value
    assert abs(got["adaptive_ece"] - ref["adaptive_ece"]) <= got["adaptive_ece_bound"] + 1e-12
    assert got["adaptive_ece_bound"] < 0.01


def test_absent_class_left_out_of_dice_mean():
    z = np.array([[5.0, 5.0, 0.0, 0.0], [0.0, 0.0, 5.0, 5.0], [-1.0, -1.0, -1.0, -1.0]])
    y = np.array([0, 1, 1, 1])
    got = _compute(z, y, np.ones(4, bool), 15, "right").compute()
    assert got["dice"][2] is None and got["iou"][2] is None
    assert got["dice"][0] == pytest.approx(2 / 3) and got["dice"][1] == pytest.approx(0.8)
    assert got["dice_mean"] == pytest.approx((2 / 3 + 0.8) / 2)


def test_adaptive_ece_exact_when_buckets_are_tied():
    # 4 distinct confidences, 100 voxels each; 4 equal-mass bins coincide with them: bound 0, exact value
    conf_values = np.array([0.55, 0.7, 0.8, 1.0])
    acc = np.array([0.2, 0.6, 0.7, 0.95])
    zs, ys = [], []
    for c, a in zip(conf_values, acc):
        top = np.log(c) if c < 1 else 0.0
        other = np.log1p(-c) if c < 1 else -200.0
        hits = int(round(a * 100))
        zs.append(np.tile([[top], [other]], (1, 100)))
        ys.append(np.r_[np.zeros(hits, int), np.ones(100 - hits, int)])
    z = np.concatenate(zs, 1)
    y = np.concatenate(ys)
    got = _compute(z, y, np.ones(z.shape[1], bool), 4, "right").compute()
    probs = np.exp(z - z.max(0)); probs /= probs.sum(0)
    confs = probs.max(0)
    expected = np.mean([abs(acc[i] - confs[i * 100]) for i in range(4)])
    assert got["adaptive_ece"] == pytest.approx(expected, rel=1e-12)
    assert got["adaptive_ece_bound"] == 0.0


def test_fine_buckets_are_monotone_and_resolve_one():
    c = torch.tensor(np.sort(np.r_[np.random.default_rng(0).random(5000), 0.5, 1.0,
                                   np.nextafter(np.float32(1), np.float32(0))]).astype(np.float32))
    keys = fine_bucket(c)
    assert bool((keys[1:] >= keys[:-1]).all())
    assert int(keys[-1]) == NUM_BUCKETS - 1 and int(keys[-2]) < NUM_BUCKETS - 1
    assert int(keys.min()) >= 0


# -- edges, 0 and 1.0: the peers -----------------------------------------------------------------------------


def _edge_probabilities(bins, C=3, repeat=4, seed=0):
    """Probabilities whose top-label confidence lies exactly on every float32 edge, at 0-ish and at 1.0."""
    rng = np.random.default_rng(seed)
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float32).numpy()
    tops = np.r_[edges[edges >= 1.0 / C], np.float32(1.0), np.float32(1.0)]
    interior = rng.uniform(1.0 / C, 1.0, size=60).astype(np.float32)  # neighbours that edge voxels join
    tops = np.r_[np.repeat(tops, repeat), interior]
    n = tops.size
    p = np.zeros((n, C), np.float32)
    cls = rng.integers(0, C, n)
    rest = (1.0 - tops.astype(np.float64)) / (C - 1)
    for k in range(C):
        p[:, k] = rest
    p[np.arange(n), cls] = tops  # the top value is stored exactly
    # confidence 1.0 wrong, the rest right: where 1.0 goes (top bin or a bin of its own) changes the ECE
    labels = np.where(tops < 1.0, cls, (cls + 1) % C)
    return p, labels


def _state_from_probs(probs, labels, bins, rule):
    """Feed the exact stored confidences (as a calibrated probability output would be fed)."""
    from segcal_cli.metrics.voxels import VoxelStats

    p = torch.from_numpy(probs.T.copy())
    y = torch.from_numpy(labels)
    conf, pred = p.max(0)
    stats = VoxelStats(probs=p, conf=conf, pred=pred, correct=pred == y,
                       nll=-p.gather(0, y[None]).squeeze(0).clamp_min(1e-12).log(),
                       brier=(p * p).sum(0) - 2 * p.gather(0, y[None]).squeeze(0) + 1)
    state = MetricState(p.shape[0], bins, rule)
    state.add(stats, y)
    return state.compute()


@pytest.mark.parametrize("bins", [10, 15, 20])
def test_right_rule_reproduces_fiducio_on_edges(bins):
    fiducio = pytest.importorskip("fiducio")
    probs, labels = _edge_probabilities(bins)
    got = _state_from_probs(probs, labels, bins, "right")
    p = torch.from_numpy(probs.T.copy())[None, :, :, None]  # (B, C, H, W)
    y = torch.from_numpy(labels)[None, :, None]
    assert got["ece"] == pytest.approx(fiducio.expected_calibration_error(p, y, n_bins=bins), rel=1e-9)
    assert got["ace"] == pytest.approx(fiducio.unweighted_calibration_error(p, y, n_bins=bins), rel=1e-9)


@pytest.mark.parametrize("bins", [10, 15, 20])
def test_torchmetrics_rule_reproduces_torchmetrics_on_edges(bins):
    tm = pytest.importorskip("torchmetrics.functional.classification")
    probs, labels = _edge_probabilities(bins)
    got = _state_from_probs(probs, labels, bins, "torchmetrics")
    preds, target = torch.from_numpy(probs), torch.from_numpy(labels)
    C = probs.shape[1]
    ece = tm.multiclass_calibration_error(preds, target, num_classes=C, n_bins=bins, norm="l1")
    mce = tm.multiclass_calibration_error(preds, target, num_classes=C, n_bins=bins, norm="max")
    assert got["ece"] == pytest.approx(float(ece), rel=1e-5)  # torchmetrics sums in float32
    assert got["mce"] == pytest.approx(float(mce), rel=1e-5)
    # and the rules do differ on this data (1.0 in its own bin, edges closed on the left)
    assert got["ece"] != pytest.approx(_state_from_probs(probs, labels, bins, "right")["ece"], rel=1e-6)


def test_rules_on_exact_edges():
    edges = torch.linspace(0, 1, 11, dtype=torch.float32)
    values = torch.cat([torch.tensor([0.0]), edges[1:]])
    assert Binner(10, "right").index(values).tolist() == [0] + list(range(10))
    assert Binner(10, "left").index(values).tolist() == [0] + list(range(1, 10)) + [9]
    assert Binner(10, "torchmetrics").index(values).tolist() == [0] + list(range(1, 11))
    # a float32 softmax that rounds to exactly 1.0 lands in the top bin under the default rule
    z = torch.tensor([[20.0], [0.0]])
    state = MetricState(2, 10, "right")
    state.update(z, torch.tensor([0]))
    assert state.reliability()[-1]["count"] == 1 and state.reliability()[-1]["confidence"] == 1.0


# -- a known true posterior ------------------------------------------------------------------------------------


def test_true_posterior_gives_ece_near_zero_and_miscalibration_its_implied_ece():
    from segcal_cli.synthetic import implied_metrics, make_case

    case = make_case((96, 96), 5, seed=3)
    valid = case.valid
    labels = torch.from_numpy(case.labels.astype(np.int64).reshape(-1))
    mask = torch.from_numpy(valid.reshape(-1))
    true_logits = np.log(np.maximum(case.posterior.astype(np.float64), 1e-300))
    for logits, expect_zero in ((true_logits, True), (case.logits.astype(np.float64), False)):
        state = MetricState(5, 15, "right")
        state.update(torch.from_numpy(logits.reshape(5, -1)), torch.where(mask, labels, 0), mask)
        got = state.compute()
        implied = implied_metrics(logits, case.posterior, valid, bins=15)
        tolerance = 4 * implied["ece_noise"]
        assert abs(got["ece"] - implied["ece"]) <= tolerance
        if expect_zero:
            assert implied["ece"] < 1e-6 and got["ece"] <= tolerance
        else:
            assert implied["ece"] > 2 * tolerance  # the generator's miscalibration is visible above noise
        assert got["nll"] == pytest.approx(implied["nll"], rel=0.05)


# -- chunking and merge order ---------------------------------------------------------------------------------


def _flat(result):
    out = []
    for key in sorted(result):
        value = result[key]
        out.extend(value if isinstance(value, list) else [value])
    return np.array([np.nan if v is None else v for v in out], dtype=np.float64)


def test_any_chunking_and_merge_order_give_the_same_result():
    z, y, valid, dist = _random_block(7, n=5000)
    whole = _compute(z, y, valid, 15, "right", dist)
    reference = whole.compute()
    rng = np.random.default_rng(1)
    cuts = np.sort(rng.choice(np.arange(1, 5000), size=6, replace=False))
    pieces = np.split(np.arange(5000), cuts)
    states = [_compute(z[:, s], y[s], valid[s], 15, "right", dist[s]) for s in pieces]
    for order in list(itertools.permutations(range(len(states))))[:: 97]:
        merged = MetricState(z.shape[0], 15, "right", boundary=True)
        for i in order:
            merged.merge(states[i])
        got = merged.compute()
        np.testing.assert_allclose(_flat(got), _flat(reference), rtol=1e-12, equal_nan=True)
        assert torch.equal(merged.bin_count, whole.bin_count) and torch.equal(merged.confusion, whole.confusion)
        assert torch.equal(merged.cw_count, whole.cw_count) and torch.equal(merged.fine_count, whole.fine_count)


# -- boundary distance ----------------------------------------------------------------------------------------


def test_boundary_distance_matches_brute_force():
    rng = np.random.default_rng(0)
    labels = np.zeros((12, 15), np.uint8)
    labels[3:9, 4:11] = 1
    labels[rng.random(labels.shape) < 0.02] = 255
    dist = boundary_distance(labels)
    boundary = np.zeros_like(labels, bool)
    for i, j in np.ndindex(labels.shape):
        for di, dj in ((1, 0), (-1, 0), (0, 1), (0, -1)):
            a, b = i + di, j + dj
            if 0 <= a < labels.shape[0] and 0 <= b < labels.shape[1] and labels[a, b] != labels[i, j]:
                boundary[i, j] = True
    points = np.argwhere(boundary)
    for i, j in np.ndindex(labels.shape):
        expected = np.sqrt(((points - [i, j]) ** 2).sum(1)).min()
        assert dist[i, j] == pytest.approx(expected, rel=1e-6)
    assert np.isinf(boundary_distance(np.ones((4, 4), np.uint8))).all()


def test_case_without_boundary_has_undefined_ba_ece():
    z = np.random.default_rng(0).normal(size=(3, 16))
    y = np.zeros(16, np.int64)
    state = _compute(z, y, np.ones(16, bool), 15, "right", np.full(16, np.inf))
    assert np.isnan(state.compute()["ba_ece"])


# -- evaluation: per case, preservation ----------------------------------------------------------------------


def _evaluation(cases, calibrate=None, sub_block=None, order=None):
    ids = [f"c{i}" for i in range(len(cases))]
    ev = Evaluation(cases[0][0].shape[0], ids, [c[1].size for c in cases], calibrate=calibrate,
                    sub_block_voxels=sub_block)
    blocks = []
    for ci, (z, y, v) in enumerate(cases):
        for s in np.array_split(np.arange(y.size), 3):
            blocks.append((ci, s))
    for bi in (order if order is not None else range(len(blocks))):
        ci, s = blocks[bi]
        z, y, v = cases[ci]
        ev.add_block(ci, torch.from_numpy(z[:, s]), torch.from_numpy(y[s]), torch.from_numpy(v[s]))
    return ev.finish()


def test_pooled_and_per_case_means():
    cases = [_random_block(s, n=900)[:3] for s in range(3)]
    result = _evaluation(cases)
    per_case = [reference_metrics(z, y, v, 15, "right") for z, y, v in cases]
    assert result.uncalibrated["per_case_mean"]["ece"] == pytest.approx(np.mean([r["ece"] for r in per_case]), rel=REL)
    pooled = reference_metrics(np.concatenate([c[0] for c in cases], 1), np.concatenate([c[1] for c in cases]),
                               np.concatenate([c[2] for c in cases]), 15, "right")
    assert result.uncalibrated["pooled"]["nll"] == pytest.approx(pooled["nll"], rel=REL)
    assert result.uncalibrated["pooled"]["ece"] == pytest.approx(pooled["ece"], rel=REL)
    assert [r["id"] for r in result.per_case] == ["c0", "c1", "c2"]
    # interleaved blocks and other sub-block sizes: same numbers
    shuffled = _evaluation(cases, sub_block=100, order=[8, 0, 4, 2, 7, 1, 5, 3, 6])
    np.testing.assert_allclose(_flat(shuffled.uncalibrated["pooled"]), _flat(result.uncalibrated["pooled"]),
                               rtol=1e-12, equal_nan=True)


def test_preservation_counts_on_hand_built_voxels():
    # 6 voxels, 3 classes. before-argmax / after-argmax / label:
    # v0 0->0 y0 (kept), v1 0->1 y0 (harmful), v2 1->0 y0 (beneficial), v3 1->2 y0 (neutral),
    # v4 2->2 y2 with a changed ranking below the top, v5 invalid (flip ignored)
    before = np.array([[3, 3, 0, 0, 0, 3], [1, 0, 3, 3, 1, 0], [0, 1, 1, 2, 3, 1]], np.float64)
    after = np.array([[3, 0, 3, 0, 0, 0], [1, 3, 0, 1, 0, 3], [0, 1, 1, 3, 3, 1]], np.float64)
    labels = np.array([0, 0, 0, 0, 2, 0])
    valid = np.array([True] * 5 + [False])
    table = {before[:, i].tobytes(): after[:, i] for i in range(6)}

    def calibrate(z):  # a per-voxel lookup table (it sees every voxel; invalid ones do not count)
        return torch.from_numpy(np.stack([table[col.tobytes()] for col in z.numpy().T], axis=1))

    ev = Evaluation(3, ["c"], [6], calibrate=calibrate)
    ev.add_block(0, torch.from_numpy(before), torch.from_numpy(labels), torch.from_numpy(valid))
    pres = ev.finish().preservation
    assert (pres["harmful_flips"], pres["beneficial_flips"], pres["neutral_flips"]) == (1, 1, 1)
    assert pres["flip_rate"] == pytest.approx(3 / 5)
    assert pres["harmful_flip_rate"] == pytest.approx(1 / 5)
    assert pres["order_changes"] == 4 and pres["order_change_rate"] == pytest.approx(4 / 5)


def test_argmax_preserving_calibrator_keeps_dice_exactly():
    cases = [_random_block(s, n=1200)[:3] for s in range(2)]

    def temperature(z):
        return z / 2.7

    def sharpen_top(z):  # argmax preserving, not order preserving: push every non-top class down unequally
        top = z.amax(0, keepdim=True)
        return torch.where(z == top, z, z - torch.arange(z.shape[0], dtype=z.dtype).unsqueeze(1) * 0.7 - 1)

    for calibrate in (temperature, sharpen_top):
        result = _evaluation(cases, calibrate=calibrate)
        assert result.calibrated["pooled"]["dice"] == result.uncalibrated["pooled"]["dice"]
        assert result.preservation["dice_mean_delta"] == 0.0 and result.preservation["flip_rate"] == 0.0
    assert _evaluation(cases, calibrate=temperature).preservation["order_change_rate"] == 0.0
    assert _evaluation(cases, calibrate=sharpen_top).preservation["order_change_rate"] > 0.0


def test_float32_logits_agree_with_float64():
    z, y, valid, dist = _random_block(11, n=4000)
    a = _compute(z, y, valid, 15, "right", dist, dtype=torch.float32).compute()
    b = _compute(z.astype(np.float32).astype(np.float64), y, valid, 15, "right", dist).compute()
    for name in ("nll", "brier", "accuracy", "dice_mean"):
        assert a[name] == pytest.approx(b[name], rel=1e-5), name
    assert a["ece"] == pytest.approx(b["ece"], abs=1e-4)


# -- speed paths: arithmetic binning, metric selection, the compiled kernel ----------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_arithmetic_binning_equals_a_binary_search_on_every_edge_and_its_neighbours(dtype):
    rng = np.random.default_rng(0)
    for bins in list(range(1, 41)) + [100, 1000]:
        edges = torch.linspace(0, 1, bins + 1, dtype=torch.float32).to(dtype)
        up = torch.nextafter(edges, torch.tensor(2.0, dtype=dtype))
        down = torch.nextafter(edges, torch.tensor(-1.0, dtype=dtype))
        values = torch.cat([edges, up, down, torch.from_numpy(rng.random(500)).to(dtype)]).clamp(0, 1)
        for rule in ("right", "left", "torchmetrics"):
            expected = torch.from_numpy(_bin_index(values.double().numpy(), bins, rule))
            assert torch.equal(Binner(bins, rule).index(values), expected), (bins, rule)


def test_metric_selection_gives_exactly_the_metrics_asked_for_with_the_same_values():
    z, y, valid, _ = _random_block(5)
    full = _compute(z, y, valid, 15, "right").compute()
    for names in (("ece",), ("nll", "brier"), ("classwise_ece", "dice"), ("adaptive_ece", "iou_mean")):
        state = MetricState(z.shape[0], 15, "right", metrics=names)
        state.update(torch.from_numpy(z), torch.from_numpy(y), torch.from_numpy(valid))
        got = state.compute()
        expected_keys = set(names) | ({"adaptive_ece_bound"} if "adaptive_ece" in names else set())
        assert set(got) == expected_keys
        for key in got:
            assert got[key] == full[key], key
        assert state.reliability() == _compute(z, y, valid, 15, "right").reliability()
    with pytest.raises(ValueError):
        MetricState(3, metrics=("ece", "nope"))


def _have_cxx() -> bool:
    import shutil

    return any(shutil.which(c) for c in ("g++", "c++", "clang++"))


@pytest.mark.skipif(not _have_cxx(), reason="torch.compile on CPU needs a C++ compiler")
def test_compiled_statistics_equal_the_eager_ones():
    """Both padded (tail) and full sub-blocks, with invalid voxels, every optional statistic, each bin rule's
    code path on edge-heavy data; compiling takes ~10 s once per process (3 classes keep it small)."""
    from segcal_cli.metrics.voxels import SUB_BLOCK_VOXELS

    rng = np.random.default_rng(3)
    C, n = 3, SUB_BLOCK_VOXELS + 4321
    z = (rng.normal(size=(C, n)) * 3).astype(np.float32)
    z[:, :2000] *= 20  # confidences of exactly 1.0
    y = rng.integers(0, C, n)
    valid = rng.random(n) > 0.1
    results = {}
    for compiled in (False, True):
        ev = Evaluation(C, ["c"], [n], compile=compiled, bin_rule="torchmetrics")
        with torch.inference_mode():
            ev.add_block(0, torch.from_numpy(z), torch.from_numpy(y), torch.from_numpy(valid))
        assert ev.compiled == compiled, ev.compile_error
        results[compiled] = ev.finish().uncalibrated["pooled"]
    eager, fused = results[False], results[True]
    assert set(eager) == set(fused)
    for key, value in eager.items():
        if isinstance(value, list):
            assert fused[key] == value, key  # counts: identical
        else:
            assert fused[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
    assert fused["accuracy"] == eager["accuracy"]
