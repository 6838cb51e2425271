"""Fit driver: data (a dataset stream or in-memory tensors) -> solver -> calibrator + fit report.

`fit_dataset` is what `segcal fit` calls; `fit_tensors` is the same on tensors, for use from code.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from segcal_cli import __version__
from segcal_cli.calibrators import Calibrator, get_method
from segcal_cli.errors import InputError
from segcal_cli.fitting.objective import (
    MARGIN_FLOOR,
    Objective,
    Parametrisation,
    SampleSource,
    StreamSource,
    mean_nll,
)
from segcal_cli.fitting.newton import EXPERT_FAMILIES, solve_experts
from segcal_cli.fitting.sampling import SCHEME, BottomKSampler, keyed_valid_voxels
from segcal_cli.fitting.solvers import FTOL, SolverResult, solve_lbfgs, solve_temperature

DEFAULT_MAX_VOXELS = 2_000_000
# ODIR defaults (docs/fitting.md): none for the one/four-parameter families; a small penalty for the
# affine and class-conditional families, negligible next to a typical NLL (0.1-0.5 nats) yet enough to keep
# rarely used experts and off-diagonal terms from drifting on little data.
DEFAULT_REGULARISATION = {
    "ts": (0.0, 0.0), "ets": (0.0, 0.0),
    "vs": (1e-3, 1e-3), "vs-ti": (1e-3, 1e-3),
    "ms": (1e-3, 1e-3), "ms-ti": (1e-3, 1e-3), "dc": (1e-3, 1e-3),
    "cdc": (1e-3, 1e-3), "cms-ap": (1e-3, 1e-3), "cms-op": (1e-3, 1e-3),
}
DEFAULT_MAX_ITER = {"ts": 100}
DEFAULT_MAX_ITER_OTHER = 500
MIN_VOXELS = 100


@dataclass
class FitOptions:
    method: str
    max_voxels: int = DEFAULT_MAX_VOXELS
    seed: int = 0
    val_fraction: float = 0.0
    lambda_reg: Optional[float] = None
    mu_reg: Optional[float] = None
    max_iter: Optional[int] = None
    ftol: float = FTOL  # L-BFGS relative-decrease stopping tolerance (solvers.FTOL)

    def resolved(self) -> "FitOptions":
        get_method(self.method)
        if self.max_voxels < 0:
            raise InputError(f"--max-voxels must be >= 0 (0 = every voxel), got {self.max_voxels}")
        if not (0.0 <= self.val_fraction < 1.0) or math.isnan(self.val_fraction):
            raise InputError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        lam, mu = DEFAULT_REGULARISATION[self.method]
        lam = lam if self.lambda_reg is None else self.lambda_reg
        mu = mu if self.mu_reg is None else self.mu_reg
        for flag, value in (("--lambda-reg", lam), ("--mu-reg", mu)):
            if not (value >= 0 and math.isfinite(value)):
                raise InputError(f"{flag} must be a finite number >= 0, got {value}")
        max_iter = self.max_iter if self.max_iter is not None else DEFAULT_MAX_ITER.get(self.method, DEFAULT_MAX_ITER_OTHER)
        if max_iter < 1:
            raise InputError(f"--max-iter must be >= 1, got {max_iter}")
        if self.seed < 0:
            raise InputError(f"--seed must be >= 0, got {self.seed}")
        return FitOptions(self.method, self.max_voxels, self.seed, self.val_fraction, lam, mu, max_iter, self.ftol)


@dataclass
class FitResult:
    calibrator: Calibrator
    report: dict
    solver: SolverResult = field(repr=False, default=None)


# ----------------------------------------------------------------------------------------------- core

# Below this many voxels a solve runs single-threaded: its per-op work (per-expert slices of a few thousand
# voxels) is smaller than the cost of waking torch's worker threads; measured 20x faster on a busy 2-core box.
SINGLE_THREAD_BELOW_VOXELS = 1_000_000


@contextlib.contextmanager
def _threads_for(num_voxels: int):
    previous = torch.get_num_threads()
    if num_voxels < SINGLE_THREAD_BELOW_VOXELS and previous > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)



def _solve(family, num_classes: int, source, opts: FitOptions, device,
           val_nll: Optional[Callable[[Calibrator], float]] = None) -> Tuple[Calibrator, SolverResult, dict]:
    name = family.name
    if name == "ts":
        res = solve_temperature(source, max_iter=opts.max_iter)
        beta = res.extra["beta"]
        if not (beta > 0 and math.isfinite(beta)):
            raise InputError("cannot fit ts: the labels are no better explained by the logits than by chance")
        cal = family.from_parameters(num_classes, {"temperature": torch.tensor(1.0 / beta, dtype=torch.float64)})
        return cal, res, {"solver": "safeguarded Newton on beta=1/T"}
    par = Parametrisation(family, num_classes)
    objective = Objective(par, source, opts.lambda_reg, opts.mu_reg, device=device)
    if name == "ets":
        ts_res = solve_temperature(source, max_iter=100)
        log_t = -math.log(ts_res.extra["beta"])
        starts = [
            np.array([log_t, *np.log([0.98, 0.01, 0.01])]),
            np.array([log_t, 0.0, 0.0, 0.0]),
            np.array([0.0, *np.log([0.2, 0.6, 0.2])]),
        ]
        best = None
        for theta0 in starts:
            objective.evaluations = 0
            res = solve_lbfgs(objective, theta0, None, opts.max_iter, opts.ftol)
            cal = family.from_parameters(num_classes, par.final_params(res.theta))
            score = val_nll(cal) if val_nll is not None else res.objective
            if best is None or score < best[0]:
                best = (score, cal, res)
        _, cal, res = best
        res.evaluations = objective.evaluations + ts_res.evaluations
        return cal, res, {"solver": "TS Newton, then L-BFGS on (log T, softmax weights) from 3 starts",
                          "start_selection": "held-out NLL" if val_nll is not None else "fit objective"}
    if name in EXPERT_FAMILIES:
        # separable over experts: an exact (projected) Newton step per expert, all experts in shared passes
        res = solve_experts(family, num_classes, source, opts.lambda_reg, opts.mu_reg, opts.max_iter, opts.ftol)
        cal = family.from_parameters(num_classes, par.final_params(res.theta))
        bounded = " with bounds B >= 0, mu >= %g" % MARGIN_FLOOR if name != "cdc" else ""
        stride = res.extra["hessian_stride"]
        hessian = "exact Hessian" if stride == 1 else f"Hessian on every {stride}th voxel"
        info = {"solver": f"{'projected ' if bounded else ''}Newton per expert{bounded} (float64, {hessian})"}
        return cal, res, info
    bounds = par.bounds()
    res = solve_lbfgs(objective, par.initial(), bounds, opts.max_iter, opts.ftol)
    cal = family.from_parameters(num_classes, par.final_params(res.theta))
    info = {"solver": "L-BFGS-B (bounds B >= 0, mu >= %g)" % MARGIN_FLOOR if bounds else "L-BFGS (float64)"}
    return cal, res, info


def _check_enough(family, num_classes: int, count: int, detail: str) -> None:
    need = max(MIN_VOXELS, family.num_parameters(num_classes))
    if count < need:
        raise InputError(
            f"too few valid voxels to fit {family.name}: {count} {detail} (need at least {need} for "
            f"{family.num_parameters(num_classes)} parameters)"
        )


def _solver_report(res: SolverResult, info: dict) -> dict:
    return {
        "iterations": res.iterations,
        "evaluations": res.evaluations,
        "gradient_norm": res.gradient_norm,
        "certificate": res.certificate,
        "converged": res.converged,
        "message": res.message,
        **info,
    }


# ----------------------------------------------------------------------------------------------- tensors API


def fit_tensors(method: str, logits: torch.Tensor, labels: torch.Tensor, *, valid: Optional[torch.Tensor] = None,
                lambda_reg: Optional[float] = None, mu_reg: Optional[float] = None, max_iter: Optional[int] = None,
                val_logits: Optional[torch.Tensor] = None, val_labels: Optional[torch.Tensor] = None,
                ftol: float = FTOL) -> FitResult:
    """Fit on in-memory classes-first logits `(C, N)` and labels `(N,)` (every given voxel, exactly).

    Labels outside [0, C) are skipped unless `valid` says which voxels to use.
    """
    opts = FitOptions(method, 0, 0, 0.0, lambda_reg, mu_reg, max_iter, ftol).resolved()
    family = get_method(method)
    num_classes = int(logits.shape[0])
    logits = logits.reshape(num_classes, -1)
    labels = labels.reshape(-1).to(torch.int64)
    if valid is None:
        valid = (labels >= 0) & (labels < num_classes)
    z, y = logits[:, valid], labels[valid]
    _check_enough(family, num_classes, int(y.numel()), "given")
    start = time.perf_counter()
    source = SampleSource(family, z, y)
    val_fn = None
    if val_logits is not None:
        vz = val_logits.reshape(num_classes, -1)
        vy = val_labels.reshape(-1).to(torch.int64)
        keep = (vy >= 0) & (vy < num_classes)
        vz, vy = vz[:, keep], vy[keep]
        val_fn = lambda cal: mean_nll(cal, [(vz, vy)])[0]  # noqa: E731
    with _threads_for(int(y.numel())):
        cal, res, info = _solve(family, num_classes, source, opts, logits.device, val_fn)
    report = {
        "method": family.name,
        "num_classes": num_classes,
        "voxels_used": int(y.numel()),
        "lambda_reg": opts.lambda_reg,
        "mu_reg": opts.mu_reg,
        "nll_before": mean_nll(family.identity(num_classes), [(z, y)])[0],
        "nll_after": mean_nll(cal, [(z, y)])[0],
        **_solver_report(res, info),
        "time_s": time.perf_counter() - start,
    }
    if val_fn is not None:
        report["val_nll_before"] = val_fn(family.identity(num_classes))
        report["val_nll_after"] = val_fn(cal)
    return FitResult(cal, report, res)


# ----------------------------------------------------------------------------------------------- dataset


def split_cases(num_cases: int, val_fraction: float, seed: int) -> Tuple[List[int], List[int]]:
    """Whole cases held out: round(fraction * cases) of them (at least one), chosen by a seeded permutation."""
    if val_fraction <= 0:
        return list(range(num_cases)), []
    if num_cases < 2:
        raise InputError(f"--val-fraction needs at least 2 cases to hold some out; the data has {num_cases}")
    n_val = min(num_cases - 1, max(1, int(round(val_fraction * num_cases))))
    order = np.random.default_rng(seed).permutation(num_cases)
    val = sorted(int(i) for i in order[:n_val])
    fit = [i for i in range(num_cases) if i not in set(val)]
    return fit, val


def _valid_blocks(ds, cases: Sequence[int], counter: dict, on_voxels=None):
    """(logits (C, m), labels (m,)) of the valid voxels of each block of `cases`."""
    counter["passes"] += 1
    for block in ds.stream(cases=list(cases)):
        if on_voxels is not None:
            on_voxels(block.logits.shape[1])
        valid = block.valid
        if bool(valid.all()):
            yield block.logits, block.labels
        elif bool(valid.any()):
            yield block.logits[:, valid], block.labels[valid]


def _float16_exact(ds) -> bool:
    """Whether every stream logit is a stored float16 value (so keeping it as float16 loses nothing)."""
    kind = ds.options.input_kind
    return all(np.dtype(c.dtype) == np.float16 and (kind == "logits" or (kind == "logprobs" and c.stored_classes > 1))
               for c in ds.cases)


def fit_dataset(ds, options: FitOptions, on_voxels: Optional[Callable[[int], None]] = None) -> FitResult:
    """Fit `options.method` on an open dataset (segcal_cli.io.open_dataset, labels required)."""
    opts = options.resolved()
    family = get_method(opts.method)
    num_classes = ds.num_classes
    if num_classes < family.min_classes():
        raise InputError(f"{family.name} needs at least {family.min_classes()} classes")
    start = time.perf_counter()
    fit_cases, val_cases = split_cases(len(ds.cases), opts.val_fraction, opts.seed)
    device = ds.device
    counter = {"passes": 0}
    sampling: dict = {"max_voxels": opts.max_voxels, "seed": opts.seed, "unit": "voxel", "class_weighting": "none"}
    val_set = set(val_cases)

    if opts.max_voxels > 0:
        store = torch.float16 if _float16_exact(ds) else None  # half the sample's memory, same numbers
        fit_sampler, val_sampler = BottomKSampler(opts.max_voxels, store), BottomKSampler(opts.max_voxels, store)
        counter["passes"] += 1
        for case_index, logits, labels, keys in keyed_valid_voxels(ds, ds.stream(), opts.seed, on_voxels):
            sampler = val_sampler if case_index in val_set else fit_sampler
            sampler.add(logits, labels, keys)
        fit_z, fit_y, threshold = fit_sampler.result(num_classes, device)
        valid_fit = fit_sampler.seen
        _check_enough(family, num_classes, int(fit_y.numel()), f"valid voxels in {len(fit_cases)} fit case(s)")
        val_z, val_y, val_threshold = val_sampler.result(num_classes, device)
        sampling.update({"scheme": SCHEME, "key_threshold": threshold, "sampled": threshold is not None})
        source = SampleSource(family, fit_z, fit_y)
        fit_raw = lambda: [(fit_z, fit_y)]  # noqa: E731
        val_raw = (lambda: [(val_z, val_y)]) if val_cases else None
    else:
        sampling.update({"scheme": "every valid voxel, exact passes over the stream", "sampled": False})
        fit_raw = lambda: _valid_blocks(ds, fit_cases, counter, on_voxels)  # noqa: E731
        val_raw = (lambda: _valid_blocks(ds, val_cases, counter)) if val_cases else None
        nll_identity, valid_fit = mean_nll(family.identity(num_classes), fit_raw())
        _check_enough(family, num_classes, valid_fit, f"valid voxels in {len(fit_cases)} fit case(s)")
        source = StreamSource(family, lambda: _valid_blocks(ds, fit_cases, counter), valid_fit)

    val_fn = (lambda cal: mean_nll(cal, val_raw())[0]) if val_raw is not None else None
    with _threads_for(source.num_voxels):
        cal, res, info = _solve(family, num_classes, source, opts, device, val_fn)

    identity = family.identity(num_classes)
    if opts.max_voxels > 0:
        nll_before, used = mean_nll(identity, fit_raw())
    else:
        nll_before, used = nll_identity, valid_fit
    nll_after = mean_nll(cal, fit_raw())[0]
    report = {
        "method": family.name,
        "num_classes": num_classes,
        "cases": len(ds.cases),
        "fit_cases": len(fit_cases),
        "val_cases": [ds.cases[i].id for i in val_cases],
        "voxels": int(ds.total_voxels),
        "valid_voxels": int(valid_fit),
        "voxels_used": int(used),
        "sampling": sampling,
        "seed": opts.seed,
        "val_fraction": opts.val_fraction,
        "lambda_reg": opts.lambda_reg,
        "mu_reg": opts.mu_reg,
        "max_iter": opts.max_iter,
        "nll_before": nll_before,
        "nll_after": nll_after,
    }
    if val_fn is not None:
        before, n_val = mean_nll(identity, val_raw())
        report.update({"val_nll_before": before, "val_nll_after": val_fn(cal), "val_voxels_used": n_val})
    report.update(_solver_report(res, info))
    report["passes"] = counter["passes"]  # passes over the data stream
    report["sample_passes"] = source.passes if opts.max_voxels > 0 else 0  # passes over the in-memory sample
    report["device"] = str(device)
    report["time_s"] = time.perf_counter() - start
    report["segcal_version"] = __version__
    return FitResult(cal, report, res)
