"""Per-expert projected Newton for the class-conditional families `cdc`, `cms-ap`, `cms-op` (theory.md §5).

Why: the objective of these families is a sum over experts. Each voxel is routed to one expert (its
argmax), and the penalty is a mean of per-expert terms, so the joint optimum is the collection of the
per-expert optima. Each expert is a small multinomial logistic regression with `p = K (d + 1)`
parameters (cms on C classes: K = d = C - 1, so 56 for C = 8; cdc: K = d = C): small enough for an exact
Newton step. One pass over the data computes, for every expert still running, the NLL, its gradient and
its Hessian at that expert's own current point, so the experts converge at their own pace (quadratically
near the optimum) within shared passes. Typical fits take 6-15 passes where joint L-BFGS-B took ~300.

Model of one expert, for its voxels' features x (d, n) and x~ = [x; 1], parameters Theta = [W | b]
(K, d + 1), u = Theta x~:
* cdc: the logits are u (all C classes);
* cms-ap: the logits are [0; -u] (top class first, competitor margins u >= 0);
* cms-op: the logits are [0; -L u] with L the lower-triangular matrix of ones (rank gaps cumulated).
With logits [0; -A u] (or u), the NLL Hessian in Theta is sum_i (A^T S_i A) (x) x~_i x~_i^T, where
S_i = diag(q_i) - q_i q_i^T is the softmax covariance of the free logits. It is assembled as
blockdiag_a(sum q_a x~ x~^T) - V V^T with V = q (x) x~ (one GEMM), then mapped by kron(A, I).
The penalty is quadratic: its per-expert Hessian blocks are computed once, from gradients of
`objective.penalty` at unit vectors (no double backward).

Bounds (cms: B >= 0, mu >= MARGIN_FLOOR): Bertsekas' projected Newton. Variables within eps of their
bound whose gradient pushes outwards form the active set and take a scaled gradient step (the
projection keeps them at the bound); the others take the Newton step of their reduced Hessian. The
step is projected onto the bounds and backtracked until it satisfies the Armijo condition along the
projection arc. Certificate: the projected-gradient infinity norm, zero exactly at a KKT point.

Large problems: the Hessian's cost per pass is about p^2 flops per voxel. When that exceeds
HESSIAN_FLOPS, the Hessian is taken on every s-th voxel (scaled by s): the gradient and the objective
stay exact, so the iteration still converges to the exact optimum, linearly instead of quadratically.
"""

from __future__ import annotations

import math
from typing import List

import numpy as np
import torch

from segcal_cli.fitting.objective import (MARGIN_FLOOR, Parametrisation, _softmax_dense, _softmax_top_zero,
                                          penalty)
from segcal_cli.fitting.solvers import FTOL, GTOL, SolverResult

EXPERT_FAMILIES = ("cdc", "cms-ap", "cms-op")
HESSIAN_FLOPS = 2e9  # per pass; above this the Hessian is subsampled (see module docstring)
MIN_HESSIAN_VOXELS_PER_PARAMETER = 8
ARMIJO = 1e-4
MAX_BACKTRACKS = 40


class _ExpertModel:
    """Shapes, index maps, bounds and the quadratic penalty of one family on C classes."""

    def __init__(self, par: Parametrisation, lambda_reg: float, mu_reg: float):
        self.name = par.name
        c = par.C
        self.C = c
        self.K = c if self.name == "cdc" else c - 1  # free output logits per voxel
        self.d = c if self.name == "cdc" else c - 1  # features per voxel
        self.p = self.K * (self.d + 1)
        K, d = self.K, self.d
        # local index a*(d+1)+j of expert k -> position in the flat theta (weight (C,K,d) then bias (C,K))
        a = torch.arange(K)[:, None]
        j = torch.arange(d + 1)[None, :]
        weight_pos = (a * d + j).clamp_max(K * d - 1)
        local = torch.where(j < d, weight_pos, K * d * c + a)  # bias: C*K*d + k*K + a (k added below)
        ks = torch.arange(c)[:, None, None]
        self.global_index = torch.where(j[None] < d, local[None] + ks * K * d, local[None] + ks * K).reshape(c, -1)
        if self.name == "cdc":
            self.lower = None
            self.output_map = None
        else:
            lower = torch.zeros(K, d + 1, dtype=torch.float64)
            lower[:, d] = MARGIN_FLOOR
            self.lower = lower.reshape(-1)
            self.output_map = (torch.eye(K, dtype=torch.float64) if self.name == "cms-ap"
                               else torch.tril(torch.ones(K, K, dtype=torch.float64)))
        self._pen_hessian, self._pen_linear = self._penalty_quadratic(par, lambda_reg, mu_reg)
        self.par = par
        self.lambda_reg, self.mu_reg = lambda_reg, mu_reg

    def _penalty_quadratic(self, par, lambda_reg, mu_reg):
        """Per-expert (H_k, g0_k) with penalty(theta) = sum_k 1/2 t_k^T H_k t_k + g0_k^T t_k + const."""
        c, p = self.C, self.p
        if lambda_reg == 0 and mu_reg == 0:
            return torch.zeros(c, p, p, dtype=torch.float64), torch.zeros(c, p, dtype=torch.float64)

        def grad_at(theta: torch.Tensor) -> torch.Tensor:
            theta = theta.clone().requires_grad_(True)
            value = penalty(self.name, par.to_params(theta), lambda_reg, mu_reg)
            (g,) = torch.autograd.grad(value, theta)
            return g

        zero = torch.zeros(par.size, dtype=torch.float64)
        g0 = grad_at(zero)
        hessian = torch.empty(c, p, p, dtype=torch.float64)
        for col in range(p):  # the penalty is block diagonal over experts: one probe per local coordinate
            probe = zero.clone()
            probe[self.global_index[:, col]] = 1.0
            hessian[:, :, col] = (grad_at(probe) - g0)[self.global_index]
        hessian = 0.5 * (hessian + hessian.transpose(1, 2))
        return hessian, g0[self.global_index]

    def initial(self) -> torch.Tensor:
        theta = torch.as_tensor(self.par.initial(), dtype=torch.float64)
        return theta[self.global_index].clone()  # (C, p)

    def to_flat(self, local: torch.Tensor) -> np.ndarray:
        flat = torch.empty(self.par.size, dtype=torch.float64)
        flat[self.global_index.reshape(-1)] = local.reshape(-1)
        return flat.numpy()

    def penalty_value(self, k: int, theta_k: torch.Tensor) -> float:
        """Expert k's penalty up to a constant (enough for comparisons along its line search)."""
        return float(0.5 * theta_k @ (self._pen_hessian[k] @ theta_k) + self._pen_linear[k] @ theta_k)

    def penalty_grad(self, k: int, theta_k: torch.Tensor) -> torch.Tensor:
        return self._pen_hessian[k] @ theta_k + self._pen_linear[k]

    def penalty_hessian(self, k: int) -> torch.Tensor:
        return self._pen_hessian[k]


def _expert_terms(model: _ExpertModel, theta_k: torch.Tensor, x: torch.Tensor, labels: torch.Tensor,
                  hessian_stride: int, want_hessian: bool):
    """NLL sum, gradient (p,), and the two Hessian pieces of one expert's voxels in one block."""
    K, d = model.K, model.d
    params = theta_k.reshape(K, d + 1)
    u = torch.addmm(params[:, d : d + 1], params[:, :d], x)  # (K, n)
    idx = torch.arange(labels.numel(), device=labels.device)
    # the objective's own softmax helpers; the softmax q is kept for the Hessian, the residual is a copy
    if model.name == "cdc":
        nll, q = _softmax_dense(u, labels)
        residual = q.clone()
        residual[labels, idx] -= 1.0
        grad_u = residual
    else:
        tail = u if model.name == "cms-ap" else model.output_map.to(u) @ u  # >= 0: logits [0; -tail]
        nll, q = _softmax_top_zero(tail, labels)
        off_top = labels > 0
        residual = q.clone()
        residual[labels[off_top] - 1, idx[off_top]] -= 1.0
        grad_u = -residual if model.name == "cms-ap" else -(model.output_map.to(u).T @ residual)
    grad = torch.cat([grad_u @ x.T, grad_u.sum(1, keepdim=True)], dim=1).reshape(-1)
    if not want_hessian:
        return nll, grad, None, None
    if hessian_stride > 1:
        q = q[:, ::hessian_stride]
        x = x[:, ::hessian_stride]
    xt = torch.cat([x, x.new_ones(1, x.shape[1])], dim=0)  # (d+1, m)
    v = (q.unsqueeze(1) * xt.unsqueeze(0)).reshape(K * (d + 1), -1)
    scale = float(hessian_stride)
    return nll, grad, scale * (v @ v.T), scale * (v @ xt.T)  # outer (p, p), diagonal blocks (p, d+1)


def _assemble_hessian(model: _ExpertModel, outer: torch.Tensor, diag_blocks: torch.Tensor) -> torch.Tensor:
    K, d1 = model.K, model.d + 1
    h = -outer
    blocks = diag_blocks.reshape(K, d1, d1)
    for a in range(K):
        h[a * d1 : (a + 1) * d1, a * d1 : (a + 1) * d1] += blocks[a]
    if model.name == "cms-op":  # logits [0; -L u]: H_u = kron(L, I)^T H_S kron(L, I)
        lift = torch.kron(model.output_map, torch.eye(d1, dtype=torch.float64))
        h = lift.T @ h @ lift
    return h


def _pass(model: _ExpertModel, source, points: torch.Tensor, active: List[bool], hessian_stride: int):
    """One pass: per active expert, NLL sum, gradient and Hessian at points[k]; and per-expert counts."""
    c, p = model.C, model.p
    nll = torch.zeros(c, dtype=torch.float64)
    grad = torch.zeros(c, p, dtype=torch.float64)
    outer = torch.zeros(c, p, p, dtype=torch.float64)
    diag = torch.zeros(c, p, model.d + 1, dtype=torch.float64)
    counts = torch.zeros(c, dtype=torch.int64)
    for features, labels in source.prepared():
        x, block_counts = features
        x = x.to(torch.float64)
        start = 0
        for k, count in enumerate(block_counts.tolist()):
            if count and active[k]:
                xk = x[:, start : start + count]
                point = points[k].to(x.device)
                part, g, o, dg = _expert_terms(model, point, xk, labels[start : start + count], hessian_stride, True)
                nll[k] += float(part)
                grad[k] += g.cpu()
                outer[k] += o.cpu()
                diag[k] += dg.cpu()
            counts[k] += count
            start += count
    return nll, grad, outer, diag, counts


def _hessian_stride(model: _ExpertModel, num_voxels: int) -> int:
    """1 (exact) unless p^2 flops per voxel exceed the budget; keeps >= 8 p Hessian voxels per expert."""
    want = math.ceil(num_voxels * model.p * model.p / HESSIAN_FLOPS)
    keep_enough = max(1, num_voxels // (model.C * MIN_HESSIAN_VOXELS_PER_PARAMETER * model.p))
    return max(1, min(want, keep_enough))


def _solve_direction(h: torch.Tensor, g: torch.Tensor, free: torch.Tensor) -> torch.Tensor:
    """Newton direction on the free coordinates: (H_FF + delta I) d = -g_F, delta grown until Cholesky works."""
    d = torch.zeros_like(g)
    if not bool(free.any()):
        return d
    h_ff = h[free][:, free]
    g_f = g[free]
    scale = float(h_ff.diagonal().abs().max()) or 1.0
    delta = 1e-12 * scale
    eye = torch.eye(h_ff.shape[0], dtype=h.dtype)
    for _ in range(12):
        factor, info = torch.linalg.cholesky_ex(h_ff + delta * eye)
        if int(info) == 0:
            d[free] = torch.cholesky_solve(-g_f.unsqueeze(1), factor).squeeze(1)
            return d
        delta *= 100.0
    d[free] = -g_f / scale
    return d


def solve_experts(family, num_classes: int, source, lambda_reg: float, mu_reg: float, max_iter: int,
                  ftol: float = FTOL, gtol: float = GTOL) -> SolverResult:
    """Projected Newton per expert; the problem is `Objective` for cdc / cms-ap / cms-op, solved exactly."""
    par = Parametrisation(family, num_classes)
    model = _ExpertModel(par, lambda_reg, mu_reg)
    c = model.C
    n_total = max(int(source.num_voxels), 1)
    stride = _hessian_stride(model, n_total)
    lower = model.lower

    def totals(k, nll_k, grad_k, outer_k, diag_k, point):
        f = float(nll_k) / n_total + model.penalty_value(k, point)
        g = grad_k / n_total + model.penalty_grad(k, point)
        h = _assemble_hessian(model, outer_k, diag_k) / n_total + model.penalty_hessian(k)
        return f, g, h

    def projected_gradient(theta_k, g):
        if lower is None:
            return g.abs().max().item() if g.numel() else 0.0
        return (theta_k - torch.maximum(lower, theta_k - g)).abs().max().item()

    theta = model.initial()
    active = [True] * c
    nll, grad, outer, diag, _ = _pass(model, source, theta, active, stride)
    passes = 1
    state = [totals(k, nll[k], grad[k], outer[k], diag[k], theta[k]) for k in range(c)]
    nll_sums = nll.clone()
    f_total0 = sum(s[0] for s in state)
    scale = max(abs(f_total0), 1e-12)
    messages = ["" for _ in range(c)]
    for k in range(c):
        if projected_gradient(theta[k], state[k][1]) <= gtol:
            active[k], messages[k] = False, "projected gradient below tolerance"
    direction = torch.zeros_like(theta)
    step = [1.0] * c
    trial = theta.clone()

    def new_direction(k):
        f, g, h = state[k]
        if lower is None:
            free = torch.ones_like(g, dtype=torch.bool)
        else:
            width = projected_gradient(theta[k], g)
            eps = min(1e-3, width)
            free = ~((theta[k] <= lower + eps) & (g > 0))
        d = _solve_direction(h, g, free)
        if lower is not None and not bool(free.all()):
            hd = h.diagonal().clamp_min(1e-12)
            d[~free] = -g[~free] / hd[~free]
        direction[k] = d
        step[k] = 1.0

    def trial_point(k):
        t = theta[k] + step[k] * direction[k]
        return torch.maximum(lower, t) if lower is not None else t

    for k in range(c):
        if active[k]:
            new_direction(k)
            trial[k] = trial_point(k)
    iterations = 0
    backtracks = [0] * c
    while any(active) and iterations < max_iter:
        iterations += 1
        nll_t, grad_t, outer_t, diag_t, _ = _pass(model, source, trial, active, stride)
        passes += 1
        for k in range(c):
            if not active[k]:
                continue
            f_old, g_old, _ = state[k]
            f_new, g_new, h_new = totals(k, nll_t[k], grad_t[k], outer_t[k], diag_t[k], trial[k])
            displacement = trial[k] - theta[k]
            expected = float(g_old @ displacement)
            if f_new <= f_old + ARMIJO * expected or (f_new <= f_old and abs(f_new - f_old) <= 1e-15 * scale):
                theta[k] = trial[k]
                state[k] = (f_new, g_new, h_new)
                nll_sums[k] = nll_t[k]
                backtracks[k] = 0
                if projected_gradient(theta[k], g_new) <= gtol:
                    active[k], messages[k] = False, "projected gradient below tolerance"
                    continue
                if f_old - f_new <= ftol * scale:
                    active[k], messages[k] = False, "objective decrease below ftol"
                    continue
                new_direction(k)
            else:
                backtracks[k] += 1
                if backtracks[k] > MAX_BACKTRACKS:
                    active[k], messages[k] = False, "line search found no decrease (float precision)"
                    continue
                # the minimiser of the quadratic through f_old, slope, f_new; kept within [0.1, 0.5] x step
                a = step[k]
                slope = float(g_old @ direction[k])
                curvature = f_new - f_old - slope * a
                guess = -slope * a * a / (2 * curvature) if curvature > 0 else 0.5 * a
                step[k] = min(max(guess, 0.1 * a), 0.5 * a)
            trial[k] = trial_point(k)

    grads = torch.stack([s[1] for s in state])
    pg = max(projected_gradient(theta[k], grads[k]) for k in range(c))
    converged = pg <= 1e-5 or all(m in ("projected gradient below tolerance", "objective decrease below ftol")
                                  for m in messages)
    if any(active):
        message = "max iterations reached"
    else:
        message = "; ".join(sorted({m for m in messages if m})) or "projected gradient below tolerance"
    flat = model.to_flat(theta)
    params = par.to_params(torch.as_tensor(flat))
    nll_mean = float(nll_sums.sum()) / n_total
    objective = nll_mean + float(penalty(model.name, params, lambda_reg, mu_reg))
    return SolverResult(
        theta=flat, objective=objective, nll=nll_mean, iterations=iterations, evaluations=passes,
        gradient_norm=pg,
        certificate="projected gradient inf-norm" if lower is not None else "gradient inf-norm",
        converged=bool(converged), message=message,
        extra={"hessian_stride": stride},
    )
