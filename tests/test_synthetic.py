"""The synthetic generator: deterministic, labels drawn from the true posterior, a documented miscalibration."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from fiducio.metrics.calibration import expected_calibration_error, negative_log_likelihood

from segcal_cli import synthetic
from segcal_cli.synthetic import IGNORE_INDEX, Miscalibration, implied_metrics, make_case, softmax


def _fiducio_ece(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """Label-based top-label ECE from the reference library (same right-closed bins)."""
    return expected_calibration_error(torch.from_numpy(probs[None].astype(np.float64)),
                                      torch.from_numpy(labels[None].astype(np.int64)),
                                      ignore_index=IGNORE_INDEX, n_bins=bins)


@pytest.fixture(scope="module")
def big_case():
    # One larger generic 2D case (no ignore) for the statistical tests: 65K independent labels.
    return make_case((256, 256), 4, seed=11, class_prior=(1.0, 0.0, -0.5, -1.5), amplitude=4.0,
                     length_scale=8.0, miscalibration=Miscalibration(temperature=0.5,
                                                                     class_bias=(0.3, 0.0, -0.1, -0.4)))


@pytest.fixture(scope="module")
def street():
    return synthetic.make_street_case(7)


@pytest.fixture(scope="module")
def brain():
    return synthetic.make_brain_case(3, (36, 40, 44))


def _assert_cases_equal(a, b):
    for name in ("logits", "labels", "posterior", "true_logits", "offset"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    assert a.params == b.params


def test_deterministic_for_a_seed(street):
    _assert_cases_equal(street, synthetic.make_street_case(7))
    _assert_cases_equal(synthetic.make_brain_case(3, (36, 40, 44)), synthetic.make_brain_case(3, (36, 40, 44)))
    other = synthetic.make_street_case(8)
    assert not np.array_equal(other.logits, street.logits)
    assert not np.array_equal(other.labels, street.labels)


def test_shapes_dtypes_and_params(street, brain):
    assert street.logits.shape == street.posterior.shape == street.true_logits.shape == (8, 96, 128)
    assert street.labels.shape == street.offset.shape == (96, 128)
    assert brain.logits.shape == (4, 36, 40, 44) and brain.labels.shape == (36, 40, 44)
    for case in (street, brain):
        assert case.logits.dtype == case.posterior.dtype == case.true_logits.dtype == np.float32
        assert case.labels.dtype == np.uint8
        assert case.ignore_index == IGNORE_INDEX == case.params["ignore_index"]
        assert len(case.class_names) == case.num_classes
        np.testing.assert_allclose(case.posterior.sum(0), 1.0, atol=1e-5)
        np.testing.assert_allclose(case.posterior, softmax(case.true_logits.astype(np.float64)), atol=1e-6)
    assert street.params["miscalibration"]["temperature"] == synthetic.STREET_MISCALIBRATION.temperature
    assert brain.params["miscalibration"]["class_bias"] == list(synthetic.BRAIN_MISCALIBRATION.class_bias)


def test_street_is_imbalanced_and_has_ignore_labels(street):
    valid = street.valid
    assert np.all(street.labels[-synthetic.STREET_IGNORE_BOTTOM_ROWS:] == IGNORE_INDEX)
    assert 0.09 < 1 - valid.mean() < 0.15  # bottom band (8.3%) + random patches (~2%)
    assert set(np.unique(street.labels[valid])) <= set(range(8))
    # Over a few images: road dominates, person and pole are rare, sky sits above road.
    cases = [synthetic.make_street_case(seed) for seed in range(4)]
    labels = np.stack([c.labels for c in cases])
    valid = labels != IGNORE_INDEX
    freq = np.bincount(labels[valid], minlength=8) / valid.sum()
    assert freq.argmax() == 0 and freq[0] > 0.25
    assert freq[6] < 0.05 and freq[7] < 0.05
    rows = np.broadcast_to(np.arange(96)[None, :, None], labels.shape)
    assert rows[labels == 3].mean() + 15 < rows[labels == 0].mean()


def test_brain_regions_are_nested(brain):
    top = brain.true_logits.argmax(0)
    freq = np.bincount(top.ravel(), minlength=4) / top.size
    assert freq[0] > 0.75 and np.all(freq[1:] > 0.001)  # dominant background, all regions present
    # The core never touches the background: some tumour class always lies between them.
    core = top == 3
    for axis in range(3):
        for shift in (1, -1):
            neighbour = np.roll(top, shift, axis=axis)
            assert not np.any(core & (neighbour == 0))


def test_labels_follow_the_posterior(big_case):
    n = big_case.labels.size
    freq = np.bincount(big_case.labels.ravel(), minlength=4) / n
    p = big_case.posterior.reshape(4, -1).astype(np.float64)
    expected = p.mean(1)
    sigma = np.sqrt((p * (1 - p)).sum(1)) / n  # labels are independent given p*
    assert np.all(np.abs(freq - expected) < 5 * sigma), (freq, expected, sigma)
    # Conditionally too: among voxels with p*_k in a bin, class k occurs at the bin's mean p*_k.
    for k in range(4):
        pk = p[k]
        yk = big_case.labels.ravel() == k
        for lo, hi in ((0.05, 0.3), (0.3, 0.7), (0.7, 0.95)):
            sel = (pk > lo) & (pk <= hi)
            if sel.sum() < 200:
                continue
            sd = np.sqrt((pk[sel] * (1 - pk[sel])).sum()) / sel.sum()
            assert abs(yk[sel].mean() - pk[sel].mean()) < 5 * sd


def test_sample_labels_exact_cases():
    rng = np.random.default_rng(0)
    onehot = np.zeros((3, 50), np.float32)
    onehot[np.arange(50) % 3, np.arange(50)] = 1
    np.testing.assert_array_equal(synthetic.sample_labels(rng, onehot), np.arange(50) % 3)
    last = np.zeros((3, 10), np.float32)
    last[2] = 1  # the last class must be reachable despite float rounding of the CDF
    assert np.all(synthetic.sample_labels(rng, last) == 2)


def test_true_posterior_is_calibrated_and_model_is_overconfident(big_case):
    labels = big_case.labels
    truth = implied_metrics(np.log(big_case.posterior), big_case.posterior)
    model = implied_metrics(big_case.logits, big_case.posterior)
    assert truth["ece"] < 1e-6 and abs(truth["accuracy"] - truth["confidence"]) < 1e-6
    # Measured against labels, the true posterior's ECE is pure sampling noise ...
    ece_true_labels = _fiducio_ece(big_case.posterior, labels)
    assert ece_true_labels < 4 * truth["ece_noise"]
    # ... and the model's ECE matches what the generator implies, far above that noise.
    ece_model_labels = _fiducio_ece(softmax(big_case.logits.astype(np.float64)), labels)
    assert abs(ece_model_labels - model["ece"]) < 4 * model["ece_noise"]
    assert model["ece"] > 20 * model["ece_noise"]
    assert model["confidence"] > model["accuracy"] + 0.03
    pred = big_case.logits.argmax(0)
    conf = softmax(big_case.logits.astype(np.float64)).max(0)
    assert conf.mean() > (pred == labels).mean() + 0.03


def test_implied_nll_and_brier_are_the_label_expectations(big_case):
    model = implied_metrics(big_case.logits, big_case.posterior)
    probs = softmax(big_case.logits.astype(np.float64))
    labels = big_case.labels.astype(np.int64)
    nll = negative_log_likelihood(torch.from_numpy(probs[None]), torch.from_numpy(labels[None]))
    n = labels.size
    logp = np.log(probs.reshape(4, -1))
    per_voxel = -logp[labels.ravel(), np.arange(n)]
    assert abs(nll - model["nll"]) < 5 * per_voxel.std() / np.sqrt(n)
    onehot = np.eye(4)[labels.ravel()].T
    brier_voxel = ((probs.reshape(4, -1) - onehot) ** 2).sum(0)
    assert abs(brier_voxel.mean() - model["brier"]) < 5 * brier_voxel.std() / np.sqrt(n)


def test_implied_metrics_by_hand():
    # Voxel 0: uniform over 5 classes -> conf exactly 0.2, on the right-closed edge of bin 0 (of 5).
    # Voxel 1: gap of 100 -> conf 1.0, in the top bin. Voxel 2: masked out.
    logits = np.zeros((5, 3))
    logits[0, 1] = 100.0
    logits[1, 2] = 50.0
    posterior = np.full((5, 3), 0.2)
    posterior[:, 1] = [0.5, 0.5, 0, 0, 0]
    out = implied_metrics(logits, posterior, valid=np.array([True, True, False]), bins=5)
    counts = [b["count"] for b in out["reliability"]]
    assert counts == [1, 0, 0, 0, 1]
    # Accuracy: voxel 0 predicts class 0 (first max) with true prob 0.2; voxel 1 predicts 0 with 0.5.
    assert out["accuracy"] == pytest.approx(0.35)
    assert out["confidence"] == pytest.approx(0.6)
    assert out["ece"] == pytest.approx(0.5 * 0 + 0.5 * 0.5)
    assert out["mce"] == pytest.approx(0.5) and out["ace"] == pytest.approx(0.25)
    assert out["nll"] == pytest.approx((np.log(5) + 0.5 * 100) / 2, rel=1e-9)
    brier0 = 5 * 0.04 - 2 * 5 * 0.04 + 1  # sum p^2 - 2 sum p q + 1
    brier1 = 1 - 2 * 0.5 + 1
    assert out["brier"] == pytest.approx((brier0 + brier1) / 2)
    assert out["ece_noise"] == pytest.approx((np.sqrt(0.2 * 0.8) + np.sqrt(0.25)) / 2)


def test_offset_has_the_stated_spread_and_leaves_the_softmax_unchanged():
    mis = Miscalibration(offset_mean=1.5, offset_std=3.0, offset_length_scale=12.0)
    with_offset = make_case((64, 80), 5, seed=4, miscalibration=mis)
    without = make_case((64, 80), 5, seed=4, miscalibration=dataclasses.replace(mis, offset_std=0.0,
                                                                                 offset_mean=0.0))
    off = with_offset.offset.astype(np.float64)
    assert off.mean() == pytest.approx(1.5, abs=1e-5)
    assert off.std() == pytest.approx(3.0, rel=1e-5)
    # Smooth: neighbouring voxels differ by much less than the spread.
    assert np.diff(off, axis=0).std() < 0.3 * off.std() and np.diff(off, axis=1).std() < 0.3 * off.std()
    # Everything else is bit-for-bit the same; the logits differ by c(x) on every class.
    for name in ("labels", "posterior", "true_logits"):
        np.testing.assert_array_equal(getattr(with_offset, name), getattr(without, name))
    np.testing.assert_allclose(with_offset.logits - without.logits, np.broadcast_to(off, (5, 64, 80)), atol=1e-5)
    np.testing.assert_allclose(softmax(with_offset.logits.astype(np.float64)),
                               softmax(without.logits.astype(np.float64)), atol=1e-5)
    # The offset is what makes the representation matter: per-voxel free energy varies by about offset_std.
    lse = np.log(np.exp(with_offset.logits.astype(np.float64)).sum(0))
    assert lse.std() > 2.0


def test_errors_concentrate_at_boundaries(big_case):
    z = big_case.true_logits
    part = np.sort(z, axis=0)
    margin = part[-1] - part[-2]
    flips = big_case.logits.argmax(0) != z.argmax(0)
    near = flips[margin < 0.5].mean()
    far = flips[margin > 3.0].mean()
    assert near > 0.1 and far < near / 10


def test_temperature_and_bias_are_applied_exactly():
    mis = Miscalibration(temperature=0.5, class_bias=(1.0, -1.0, 0.0), boundary_noise=0.0, offset_std=0.0)
    case = make_case((32, 32), 3, seed=2, miscalibration=mis)
    expected = case.true_logits / 0.5 + np.array([1.0, -1.0, 0.0], np.float32)[:, None, None]
    np.testing.assert_allclose(case.logits, expected, rtol=1e-6, atol=1e-5)
    with pytest.raises(ValueError):
        make_case((8, 8), 3, seed=0, miscalibration=Miscalibration(class_bias=(1.0, 2.0)))


def test_smooth_fields_are_standardised_smooth_and_deterministic():
    a = synthetic.smooth_fields(np.random.default_rng(1), 3, (40, 50, 30), 9.0)
    b = synthetic.smooth_fields(np.random.default_rng(1), 3, (40, 50, 30), 9.0)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (3, 40, 50, 30) and a.dtype == np.float32
    flat = a.reshape(3, -1).astype(np.float64)
    np.testing.assert_allclose(flat.mean(1), 0, atol=1e-5)
    np.testing.assert_allclose(flat.std(1), 1, rtol=1e-5)
    for axis in (1, 2, 3):
        x = np.moveaxis(a, axis, -1)
        lag1 = np.corrcoef(x[..., 1:].ravel(), x[..., :-1].ravel())[0, 1]
        assert lag1 > 0.9
    # Independent fields are (nearly) uncorrelated (given many correlation lengths per field).
    many = synthetic.smooth_fields(np.random.default_rng(2), 2, (256, 256), 4.0).reshape(2, -1)
    assert abs(np.corrcoef(many[0], many[1])[0, 1]) < 0.1


def test_ignore_fraction_generic():
    case = make_case((64, 64), 3, seed=0, ignore_fraction=0.1)
    frac = 1 - case.valid.mean()
    assert 0.1 <= frac < 0.15
    m = implied_metrics(case.logits, case.posterior, case.valid)
    assert m["voxels"] == int(case.valid.sum())
