"""Fitting: recovery of known calibrators, optimality, translation invariance of fitted TI families,
agreement with fiducio, exact streaming, reproducible sampling, and the `segcal fit` command."""

from __future__ import annotations

import json
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch

from segcal_cli.calibrators import METHODS, get_method, load_artifact
from segcal_cli.errors import InputError
from segcal_cli.fitting import FitOptions, fit_dataset, fit_tensors
from segcal_cli.io import DataOptions, open_dataset


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These problems are tiny: torch's worker threads cost more than the work (and CI boxes are busy)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _nll(cal, z, y):
    g = cal.forward(z.double())
    return float((torch.logsumexp(g, 0) - g.gather(0, y[None])[0]).mean())


def _draw(true_cal, C, n, seed, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    z = scale * torch.randn(C, n, generator=g, dtype=torch.float64)
    p = true_cal.probabilities(z)
    y = torch.multinomial(p.T, 1, generator=g).squeeze(1)
    return z, y


def _gauge_fixed(name, params):
    """Remove the softmax gauge (b + c1, W + 1v^T) so parameters can be compared."""
    out = {k: v.clone() for k, v in params.items()}
    if "bias" in out and name in ("vs", "vs-ti", "ms", "dc"):
        out["bias"] = out["bias"] - out["bias"].mean()
    if name in ("ms", "dc"):
        out["weight"] = out["weight"] - out["weight"].mean(0, keepdim=True)
    return out


# --------------------------------------------------------------------------- recovery


@pytest.mark.parametrize(
    "name, true_params, tol",
    [
        ("ts", {"temperature": 2.5}, 0.03),
        ("vs", {"weight": [0.6, 1.3, 0.9], "bias": [0.4, -0.3, 0.1]}, 0.08),
        ("dc", {"weight": [[0.8, 0.2, 0.0], [0.1, 1.2, -0.2], [0.0, 0.3, 0.7]], "bias": [0.3, -0.2, 0.0]}, 0.12),
        ("cms-ap", {"weight": [[[0.6, 0.1], [0.0, 1.4]], [[1.2, 0.0], [0.2, 0.5]], [[0.8, 0.0], [0.0, 0.8]]],
                    "bias": [[0.3, 0.0], [0.1, 0.5], [0.2, 0.2]]}, 0.15),
    ],
)
def test_fit_recovers_known_calibrator(name, true_params, tol):
    C = 3
    true = get_method(name).from_parameters(C, true_params)
    z, y = _draw(true, C, 60_000, seed=1)
    result = fit_tensors(name, z.float(), y, lambda_reg=0.0, mu_reg=0.0)
    fitted = _gauge_fixed(name, result.calibrator.parameters())
    want = _gauge_fixed(name, true.parameters())
    for key in want:
        err = float((fitted[key] - want[key]).abs().max())
        assert err < tol * max(1.0, float(want[key].abs().max())), (key, err)
    # the fit is the optimum on these voxels: no worse than the true parameters
    assert _nll(result.calibrator, z.float(), y) <= _nll(true, z.float(), y) + 1e-6
    assert result.report["converged"] and result.report["gradient_norm"] < 1e-4


@pytest.mark.parametrize("name", [n for n in METHODS if n not in ("ts",)])
def test_every_family_fits_converges_and_beats_identity(name):
    C = 3
    true = get_method(name).random(C, torch.Generator().manual_seed(4))
    z, y = _draw(true, C, 4000, seed=5)
    result = fit_tensors(name, z.float(), y)
    rep = result.report
    assert rep["nll_after"] < rep["nll_before"]
    assert rep["converged"], rep["message"]
    # the artifact validation accepts what the fit produced (constraints hold)
    get_method(name).from_parameters(C, result.calibrator.parameters())


# --------------------------------------------------------------------------- per-expert Newton (cdc, cms-*)


def _joint_lbfgs(name, C, z, y, lam):
    """The whole problem solved jointly by scipy's L-BFGS-B: an independent route to the same optimum."""
    from segcal_cli.fitting.objective import Objective, Parametrisation, SampleSource
    from segcal_cli.fitting.solvers import solve_lbfgs

    family = get_method(name)
    par = Parametrisation(family, C)
    objective = Objective(par, SampleSource(family, z, y), lam, lam)
    return solve_lbfgs(objective, par.initial(), par.bounds(), 3000, 1e-15)


@pytest.mark.parametrize("name, lam", [("cms-ap", 0.0), ("cms-op", 1e-3), ("cdc", 1e-3)])
def test_per_expert_newton_reaches_the_joint_optimum_with_active_bounds(name, lam):
    C = 3
    family = get_method(name)
    params = family.random(C, torch.Generator().manual_seed(31)).parameters()
    if name != "cdc":  # true off-diagonal B = 0: noise puts about half of the fitted ones on the bound
        params["weight"] = torch.diag_embed(torch.diagonal(params["weight"], dim1=1, dim2=2))
    z, y = _draw(family.from_parameters(C, params), C, 3000, seed=32)
    newton = fit_tensors(name, z, y, lambda_reg=lam, mu_reg=lam, ftol=1e-15)
    joint = _joint_lbfgs(name, C, z, y, lam)
    rep = newton.report
    assert "Newton per expert" in rep["solver"] and rep["converged"] and rep["gradient_norm"] <= 1e-7
    assert rep["evaluations"] < 40  # Newton: a handful of passes (L-BFGS-B needs hundreds)
    # the same optimum: Newton's objective is no higher, and the two agree to the solvers' tolerance
    assert newton.solver.objective <= joint.objective + 1e-12
    assert joint.objective - newton.solver.objective < 1e-9
    if name != "cdc":
        weight = newton.calibrator.parameters()["weight"]
        assert int((weight == 0).sum()) >= 2  # KKT point with active bounds, certified above


def test_subsampled_hessian_still_reaches_the_exact_optimum(monkeypatch):
    import segcal_cli.fitting.newton as newton

    C = 3
    true = get_method("cms-op").random(C, torch.Generator().manual_seed(33))
    z, y = _draw(true, C, 6000, seed=34)
    exact = fit_tensors("cms-op", z, y, ftol=1e-15)
    monkeypatch.setattr(newton, "HESSIAN_FLOPS", 1e4)  # forces the Hessian onto every s-th voxel
    sub = fit_tensors("cms-op", z, y, ftol=1e-15)
    assert sub.solver.extra["hessian_stride"] > 1 == exact.solver.extra["hessian_stride"]
    assert "every" in sub.report["solver"] and sub.report["converged"]
    assert abs(sub.solver.objective - exact.solver.objective) < 1e-10
    assert sub.report["evaluations"] > exact.report["evaluations"]  # linear, not quadratic, convergence


def test_expert_without_voxels_keeps_its_penalty_optimum():
    C = 4
    true = get_method("cms-ap").random(C, torch.Generator().manual_seed(35))
    z, y = _draw(true, C, 3000, seed=36)
    z[3] = z[:3].min(0).values - 1.0  # class 3 is never the argmax: expert 3 sees no voxel
    result = fit_tensors("cms-ap", z, y)
    params = result.calibrator.parameters()
    assert result.report["converged"]
    torch.testing.assert_close(params["weight"][3], torch.eye(C - 1, dtype=torch.float64), rtol=0, atol=1e-12)
    assert float(params["bias"][3].max()) <= 1e-6 + 1e-15  # the floor: identity up to MARGIN_FLOOR


# --------------------------------------------------------------------------- translation invariance of fits


@pytest.mark.parametrize("name", list(METHODS))
def test_fitted_probabilities_ignore_per_voxel_offsets_for_ti_families(name):
    C, n = 3, 3000
    cls = get_method(name)
    true = get_method("dc").random(C, torch.Generator().manual_seed(7))
    z, y = _draw(true, C, n, seed=8)
    offset = 10.0 * torch.randn(1, n, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    # default regularisation: strictly convex, so the optimum (not just its probabilities) is unique
    fit_plain = fit_tensors(name, z, y, ftol=1e-13).calibrator
    fit_shifted = fit_tensors(name, z + offset, y, ftol=1e-13).calibrator
    p_plain = fit_plain.probabilities(z)
    p_shifted = fit_shifted.probabilities(z + offset)
    diff = float((p_plain - p_shifted).abs().max())
    if cls.properties.translation_invariant:
        # equal up to the solvers' stopping tolerance (the features agree to float64 rounding)
        assert diff < 1e-5
    else:
        assert diff > 1e-2


# --------------------------------------------------------------------------- fiducio on the same voxels


def _fiducio_nll(cal, z, y):
    p = cal.predict_proba(z.T.contiguous().double()).double()
    return float(-p.gather(1, y[:, None]).clamp_min(1e-300).log().mean())


def test_ts_temperature_agrees_with_fiducio():
    from fiducio.calibrators import TemperatureScaling

    true = get_method("ts").from_parameters(4, {"temperature": 1.7})
    z, y = _draw(true, 4, 20_000, seed=11)
    ours = fit_tensors("ts", z.float(), y).calibrator.temperature
    theirs = TemperatureScaling(optimizer="lbfgs", device="cpu").fit(z.float().T.contiguous(), y).temperature
    assert abs(ours - theirs) / theirs < 1e-3


@pytest.mark.parametrize("name, fiducio_name", [("ms", "MS"), ("dc", "DC"), ("cdc", "CDC"), ("cms-ap", "CMSAP"),
                                                ("cms-op", "CMSOP")])
def test_nll_no_higher_than_fiducio_without_regularisation(name, fiducio_name):
    import fiducio.calibrators as fc

    C = 3
    true = get_method(name).random(C, torch.Generator().manual_seed(12))
    z, y = _draw(true, C, 4000, seed=13)
    ours = fit_tensors(name, z.float(), y, lambda_reg=0.0, mu_reg=0.0).calibrator
    theirs = getattr(fc, fiducio_name)(device="cpu", lambda_reg=0.0, mu_reg=0.0).fit(z.float().T.contiguous(), y)
    assert _nll(ours, z.float(), y) <= _fiducio_nll(theirs, z.float(), y) + 1e-4


# --------------------------------------------------------------------------- data files: streaming and sampling


def _write_h5(path, z, y):
    """z (N, C, H, W), y (N, H, W) uint8 with 255 = ignore."""
    with h5py.File(path, "w") as f:
        f.create_dataset("logits", data=z.numpy().astype(np.float32), chunks=(1, z.shape[1], 8, 8))
        f.create_dataset("labels", data=y.numpy().astype(np.uint8), chunks=(1, 8, 8))


@pytest.fixture(scope="module")
def small_file(tmp_path_factory):
    C, N, H, W = 3, 5, 24, 20
    g = torch.Generator().manual_seed(21)
    true = get_method("cms-ap").random(C, torch.Generator().manual_seed(22))
    z = 3 * torch.randn(N, C, H, W, generator=g)
    p = true.probabilities(z.permute(1, 0, 2, 3).reshape(C, -1).double())
    y = torch.multinomial(p.T, 1, generator=g).reshape(N, H, W)
    y[:, :2, :] = 255  # ignored rows
    path = tmp_path_factory.mktemp("fitdata") / "val.h5"
    _write_h5(path, z, y)
    flat_z = z.permute(1, 0, 2, 3).reshape(C, -1)
    flat_y = y.reshape(-1)
    keep = flat_y != 255
    return path, flat_z[:, keep], flat_y[keep]


@pytest.mark.parametrize("name", ["ts", "dc", "cms-op"])
def test_exact_streaming_equals_in_memory_fit(small_file, name):
    path, z, y = small_file
    with open_dataset([str(path)], DataOptions(device="cpu", chunk_voxels=300), require_labels=True) as ds:
        streamed = fit_dataset(ds, FitOptions(name, max_voxels=0))
    memory = fit_tensors(name, z, y, ftol=FitOptions(name).ftol)
    assert streamed.report["voxels_used"] == y.numel() == streamed.report["valid_voxels"]
    assert streamed.report["passes"] >= streamed.report["evaluations"]
    for key, value in memory.calibrator.parameters().items():
        torch.testing.assert_close(streamed.calibrator.parameters()[key], value, rtol=1e-6, atol=1e-6)
    assert abs(streamed.report["nll_after"] - memory.report["nll_after"]) < 1e-9


def test_sample_is_reproducible_and_independent_of_chunking(small_file):
    path, z, y = small_file
    results = []
    for chunk, seed in ((200, 3), (1500, 3), (200, 4)):
        with open_dataset([str(path)], DataOptions(device="cpu", chunk_voxels=chunk), require_labels=True) as ds:
            results.append(fit_dataset(ds, FitOptions("ts", max_voxels=700, seed=seed)))
    a, b, c = results
    assert a.report["voxels_used"] == 700 and a.report["sampling"]["sampled"]
    assert a.report["sampling"]["key_threshold"] == b.report["sampling"]["key_threshold"]
    assert a.calibrator.temperature == b.calibrator.temperature  # bit-identical
    assert a.calibrator.temperature != c.calibrator.temperature  # another seed, another sample
    # a sample at least as large as the data is the data: same fit as the exact one
    with open_dataset([str(path)], DataOptions(device="cpu"), require_labels=True) as ds:
        full = fit_dataset(ds, FitOptions("ts", max_voxels=10**6))
    assert full.report["voxels_used"] == y.numel() and not full.report["sampling"]["sampled"]


def test_val_fraction_holds_out_whole_cases(small_file):
    path, _, _ = small_file
    with open_dataset([str(path)], DataOptions(device="cpu"), require_labels=True) as ds:
        res = fit_dataset(ds, FitOptions("ts", val_fraction=0.4, seed=1))
    rep = res.report
    assert rep["fit_cases"] == 3 and len(rep["val_cases"]) == 2
    assert rep["val_nll_after"] < rep["val_nll_before"]
    assert rep["voxels_used"] == 3 * 22 * 20 and rep["val_voxels_used"] == 2 * 22 * 20


def test_too_few_voxels_and_bad_options_are_input_errors(small_file):
    path, z, y = small_file
    with pytest.raises(InputError, match="too few valid voxels to fit cdc"):
        fit_tensors("cdc", z[:, :20], y[:20])
    with pytest.raises(InputError, match="--val-fraction"):
        FitOptions("ts", val_fraction=1.0).resolved()
    with pytest.raises(InputError, match="--max-voxels"):
        FitOptions("ts", max_voxels=-1).resolved()
    with pytest.raises(InputError, match="--lambda-reg"):
        FitOptions("dc", lambda_reg=-1.0).resolved()
    with pytest.raises(InputError, match="unknown method 'isotonic'"):
        FitOptions("isotonic").resolved()


def test_fitted_cms_ap_keeps_every_argmax(small_file):
    _, z, y = small_file
    cal = fit_tensors("cms-ap", z, y).calibrator
    assert torch.equal(cal.forward(z).max(0).indices, z.max(0).indices)


# --------------------------------------------------------------------------- the command


def _segcal(*args):
    return subprocess.run([sys.executable, "-m", "segcal_cli", *map(str, args)], capture_output=True, text=True)


def test_fit_command_writes_artifact_and_report(small_file, tmp_path):
    path, z, y = small_file
    out = tmp_path / "cal.json"
    run = _segcal("fit", path, "--method", "ms-ti", "-o", out, "--val-fraction", "0.4", "--json", "-",
                  "--device", "cpu", "--quiet")
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)  # stdout holds the JSON alone
    for key in ("method", "cases", "voxels", "voxels_used", "nll_before", "nll_after", "val_nll_before",
                "val_nll_after", "iterations", "gradient_norm", "converged", "passes", "time_s", "sampling"):
        assert key in report
    cal, info = load_artifact(out, expect_classes=3)
    assert info["method"] == "ms-ti" and info["fit"]["seed"] == 0 and info["fit"]["lambda_reg"] == 1e-3
    assert "NLL" in run.stderr  # the human summary went to stderr


def test_fit_command_bad_input_exits_2_and_writes_nothing(tmp_path):
    # (an unknown --method takes the same InputError -> exit 2 path; its message is checked in process in
    # test_too_few_voxels_and_bad_options_are_input_errors: one interpreter start saved)
    out = tmp_path / "cal.json"
    sparse = tmp_path / "sparse.h5"
    labels = torch.full((2, 8, 8), 255, dtype=torch.int64)
    labels[:, 0, :5] = torch.tensor([0, 1, 2, 1, 0])
    _write_h5(sparse, torch.randn(2, 3, 8, 8), labels)
    run = _segcal("fit", sparse, "--method", "cdc", "-o", out, "--device", "cpu")
    assert run.returncode == 2 and "too few valid voxels to fit cdc: 10" in run.stderr, run.stderr
    assert "Traceback" not in run.stderr and len(run.stderr.strip().splitlines()) == 1
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["sparse.h5"]


def test_a_missing_output_directory_or_bad_suffix_is_refused_before_any_read(small_file, tmp_path):
    """artifact.check_destination: what `segcal fit` checks before reading data, and save_artifact again."""
    from segcal_cli.calibrators import save_artifact
    from segcal_cli.calibrators.artifact import check_destination

    missing = tmp_path / "missing" / "cal.json"
    with pytest.raises(InputError, match="output directory .*missing.* does not exist"):
        check_destination(missing)
    with pytest.raises(InputError, match="does not exist"):
        save_artifact(get_method("ts").identity(3), missing)
    with pytest.raises(InputError, match=r"\.json or \.pt"):
        check_destination(tmp_path / "cal.txt")
    assert check_destination(tmp_path / "cal.pt") == "pt"
    path, _, _ = small_file
    run = _segcal("fit", path, "--method", "ts", "-o", missing, "--device", "cpu", "--quiet")
    assert run.returncode == 2 and "does not exist" in run.stderr and str(missing) in run.stderr, run.stderr
    assert not missing.parent.exists()


@pytest.mark.parametrize("method", ["ts", "vs"])
def test_float16_data_keeps_a_float16_sample_with_the_same_fit(tmp_path, method):
    """A sampled fit of float16 logits keeps its sample as float16 (half the memory; every value is a
    float16 already) and gives exactly the fit of the same values stored as float32."""
    from segcal_cli.fitting import driver

    rng = np.random.default_rng(3)
    logits = (rng.normal(size=(3, 5, 30, 40)) * 4).astype(np.float16)
    labels = rng.integers(0, 5, size=(3, 30, 40)).astype(np.uint8)
    paths = {}
    for name, data in (("half", logits), ("single", logits.astype(np.float32))):
        paths[name] = tmp_path / f"{name}.h5"
        with h5py.File(paths[name], "w") as f:
            f.create_dataset("logits", data=data, chunks=(1, 5, 16, 16))
            f.create_dataset("labels", data=labels, chunks=(1, 16, 16))
    results = {}
    for name, path in paths.items():
        ds = open_dataset([str(path)], DataOptions(device="cpu"))
        assert driver._float16_exact(ds) == (name == "half")
        results[name] = fit_dataset(ds, FitOptions(method, max_voxels=1500, seed=4))
    for key, value in results["half"].calibrator.parameters().items():
        assert torch.equal(value, results["single"].calibrator.parameters()[key]), key
