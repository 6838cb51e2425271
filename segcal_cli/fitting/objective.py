"""The fitting objective (theory.md §5): mean NLL over valid voxels + ODIR-style penalty.

Data reach the objective through a `Source`: something that yields prepared blocks (the family's
parameter-free features + re-indexed labels). `SampleSource` prepares an in-memory sample once;
`StreamSource` prepares every block of a dataset stream on each pass, so an exact full-data evaluation
needs memory for one block only. Sums are accumulated in float64, block by block.

`Parametrisation` maps a flat float64 vector theta (what the solvers see) to the family's named parameters,
with bounds and the penalty.
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator, List, Optional, Tuple

import numpy as np
import torch

from segcal_cli.calibrators.base import Calibrator, Params, class_sum

# Voxels per prepared block: engineering.md measured 64K-256K voxel ops as the fastest on CPU.
PREPARED_BLOCK_VOXELS = 1 << 16
# cms-ap / cms-op: the fit keeps mu >= this floor, so every competitor margin stays strictly positive
# and the top class keeps a strict lead in floating point (theory.md §4 "strictness").
MARGIN_FLOOR = 1e-6


# ----------------------------------------------------------------------------------------------- sources


class SampleSource:
    """An in-memory (C, N) sample + labels, prepared once in blocks for `family`."""

    def __init__(self, family: type, logits: torch.Tensor, labels: torch.Tensor,
                 block_voxels: int = PREPARED_BLOCK_VOXELS):
        self.family = family
        self.num_voxels = int(labels.numel())
        self.passes = 0
        self.blocks: List[Tuple[tuple, torch.Tensor]] = []
        for start in range(0, self.num_voxels, block_voxels):
            z = logits[:, start : start + block_voxels]
            y = labels[start : start + block_voxels]
            features, prepared_labels = family.prepare(z.float() if z.dtype != torch.float64 else z, y)
            # cast once here, not on every pass (the sample is evaluated tens to hundreds of times)
            # (ts keeps float32: its Newton pass computes per voxel in float32 and sums in float64)
            self.blocks.append((features if family.name == "ts" else _as_float64(features), prepared_labels))

    def prepared(self) -> Iterator[Tuple[tuple, torch.Tensor]]:
        self.passes += 1
        return iter(self.blocks)


class StreamSource:
    """Every valid voxel of some cases of a dataset, streamed and prepared on each pass."""

    def __init__(self, family: type, raw_blocks: Callable[[], Iterable[Tuple[torch.Tensor, torch.Tensor]]],
                 num_voxels: int, block_voxels: int = PREPARED_BLOCK_VOXELS):
        self.family = family
        self.raw_blocks = raw_blocks
        self.num_voxels = int(num_voxels)
        self.block_voxels = block_voxels
        self.passes = 0

    def prepared(self) -> Iterator[Tuple[tuple, torch.Tensor]]:
        self.passes += 1
        for z, y in self.raw_blocks():
            for start in range(0, y.numel(), self.block_voxels):
                yield self.family.prepare(z[:, start : start + self.block_voxels], y[start : start + self.block_voxels])


def logsumexp_classes_first(g: torch.Tensor) -> torch.Tensor:
    """logsumexp over axis 0; torch.logsumexp over the leading axis of a (C, n) block was ~10x slower here."""
    top = g.max(0).values
    if top.requires_grad:
        top = top.detach()  # any constant works; detaching keeps the backward pass to the exp-sum path
    return class_sum((g - top.unsqueeze(0)).exp()).squeeze(0).log() + top


def _nll_sum(g: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return (logsumexp_classes_first(g) - g.gather(0, labels.unsqueeze(0)).squeeze(0)).sum()


def _as_float64(features):
    return tuple(f.to(torch.float64) if f.dtype.is_floating_point else f for f in features)


# ----------------------------------------------------------------------------------------------- penalty


def _offdiag_mean_sq(matrix: torch.Tensor) -> torch.Tensor:
    """mean of squared off-diagonal entries of (..., C, C)."""
    c = matrix.shape[-1]
    mask = ~torch.eye(c, dtype=torch.bool, device=matrix.device)
    return matrix[..., mask].square().mean(-1)


def _expert_logit_maps(kind: str, weight: torch.Tensor, bias: torch.Tensor):
    """The affine map each cms expert induces (theory.md §5): W_k = 1 e_top^T - S B_k D, b_k = -S mu_k.

    Gauge: the top class (cms-ap: class k; cms-op: rank 1) passes through, so the identity calibrator
    (B = I, mu = 0) induces W = I, b = 0 and costs no penalty. For cms-op the map acts on the sorted
    vector (rank coordinates); a permutation does not change the off-diagonal mean.
    """
    c = weight.shape[0]
    dtype, device = weight.dtype, weight.device
    rows = torch.arange(c - 1, device=device)
    D = torch.zeros(c, c - 1, c, dtype=dtype, device=device)
    S = torch.zeros(c, c, c - 1, dtype=dtype, device=device)
    top = torch.zeros(c, c, c, dtype=dtype, device=device)
    for k in range(c):
        if kind == "cms-ap":
            comp = torch.tensor([j for j in range(c) if j != k], device=device)
            D[k, rows, k] = 1.0
            D[k, rows, comp] = -1.0
            S[k, comp, rows] = 1.0
            top[k, :, k] = 1.0
        else:  # cms-op: gaps between consecutive ranks, outputs cumulated from the top rank
            D[k, rows, rows] = 1.0
            D[k, rows, rows + 1] = -1.0
            S[k] = torch.tril(torch.ones(c, c - 1, dtype=dtype, device=device), diagonal=-1)
            top[k, :, 0] = 1.0
    maps = top - S @ weight @ D
    biases = -(S @ bias.unsqueeze(-1)).squeeze(-1)
    return maps, biases


def penalty(name: str, params: Params, lambda_reg: float, mu_reg: float) -> torch.Tensor:
    """ODIR-style regularisation: lambda*mean(offdiag(W)^2) + mu*mean(b^2) (vs: lambda*mean((w-1)^2))."""
    ref = next(iter(params.values()))
    total = ref.new_zeros(())
    if lambda_reg == 0 and mu_reg == 0:
        return total
    if name in ("ts", "ets"):
        return total
    if name in ("vs", "vs-ti"):
        return lambda_reg * (params["weight"] - 1).square().mean() + mu_reg * params["bias"].square().mean()
    if name in ("ms", "ms-ti", "dc"):
        return lambda_reg * _offdiag_mean_sq(params["weight"]) + mu_reg * params["bias"].square().mean()
    if name == "cdc":
        per_expert = lambda_reg * _offdiag_mean_sq(params["weight"]) + mu_reg * params["bias"].square().mean(-1)
        return per_expert.mean()
    if name in ("cms-ap", "cms-op"):
        maps, biases = _expert_logit_maps(name, params["weight"], params["bias"])
        per_expert = lambda_reg * _offdiag_mean_sq(maps) + mu_reg * biases.square().mean(-1)
        return per_expert.mean()
    raise KeyError(name)


# ----------------------------------------------------------------------------------------------- theta


class Parametrisation:
    """Flat float64 theta <-> named parameters, initial point (the identity), bounds."""

    def __init__(self, family: type, num_classes: int):
        self.family = family
        self.name = family.name
        self.C = num_classes
        c = num_classes
        if self.name == "ms-ti":
            # W's first C-1 columns, the shared row sum s, the bias; the last column is s - (row sum).
            self.shapes = {"columns": (c, c - 1), "row_sum": (), "bias": (c,)}
        elif self.name == "ets":
            self.shapes = {"log_temperature": (), "weight_logits": (3,)}
        else:
            self.shapes = dict(family.parameter_shapes(c))
        self.sizes = [int(np.prod(s)) if s else 1 for s in self.shapes.values()]
        self.size = sum(self.sizes)

    def split(self, theta: torch.Tensor) -> dict:
        out, start = {}, 0
        for (key, shape), size in zip(self.shapes.items(), self.sizes):
            out[key] = theta[start : start + size].reshape(shape)
            start += size
        return out

    def to_params(self, theta: torch.Tensor) -> Params:
        parts = self.split(theta)
        if self.name == "ms-ti":
            columns, row_sum = parts["columns"], parts["row_sum"]
            last = row_sum - columns.sum(1, keepdim=True)
            return {"weight": torch.cat([columns, last], dim=1), "bias": parts["bias"]}
        if self.name == "ets":
            return {"temperature": parts["log_temperature"].exp(), "weights": torch.softmax(parts["weight_logits"], 0)}
        return parts

    def from_params(self, params: Params) -> np.ndarray:
        if self.name == "ms-ti":
            w = params["weight"]
            pieces = [w[:, :-1], w.sum(1).mean().reshape(()), params["bias"]]
        elif self.name == "ets":
            w = params["weights"].clamp_min(1e-12)
            pieces = [params["temperature"].log(), w.log() - w.log().mean()]
        else:
            pieces = [params[k] for k in self.shapes]
        return torch.cat([p.reshape(-1).to(torch.float64).cpu() for p in pieces]).numpy()

    def initial(self) -> np.ndarray:
        params = self.family.identity(self.C).parameters()
        if self.name in ("cms-ap", "cms-op"):
            params["bias"] = torch.full_like(params["bias"], MARGIN_FLOOR)
        return self.from_params(params)

    def bounds(self) -> Optional[list]:
        if self.name not in ("cms-ap", "cms-op"):
            return None
        c = self.C
        n_weight = c * (c - 1) * (c - 1)
        n_bias = c * (c - 1)
        return [(0.0, None)] * n_weight + [(MARGIN_FLOOR, None)] * n_bias

    def final_params(self, theta: np.ndarray) -> Params:
        with torch.no_grad():
            params = self.to_params(torch.as_tensor(theta, dtype=torch.float64))
            params = {k: v.clone() for k, v in params.items()}
        if self.name == "ms-ti":  # exact equal row sums: recompute the last column in float64 from s
            w = params["weight"]
            s = w.sum(1).mean()
            w[:, -1] = s - w[:, :-1].sum(1)
        if self.name in ("cms-ap", "cms-op"):  # L-BFGS-B keeps bounds; clamp guards -0.0 / rounding
            params["weight"] = params["weight"].clamp_min(0.0)
            params["bias"] = params["bias"].clamp_min(0.0)
        return params


# ----------------------------------------------------------------------------------------------- objective


def _softmax_dense(g: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """NLL sum and softmax(g) for logits g (K, n); g is overwritten (and holds the softmax)."""
    picked = g.gather(0, labels.unsqueeze(0)).squeeze(0)
    top = g.max(0).values
    e = g.sub_(top).exp_()
    total = class_sum(e).squeeze(0)
    nll = (total.log() + top - picked).sum()
    return nll, e.div_(total)


def _residual_dense(g: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """NLL sum and the residual softmax(g) - onehot(y) for logits g (K, n); g is overwritten."""
    nll, residual = _softmax_dense(g, labels)
    residual[labels, torch.arange(labels.numel(), device=labels.device)] -= 1.0
    return nll, residual


def _softmax_top_zero(tail: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """As _softmax_dense for logits [0; -tail] with tail >= 0 (the top row is 0, the maximum: no shift).

    Returns the NLL sum and the softmax of the tail rows only (the top row's is not needed); tail is
    overwritten.
    """
    off_top = labels > 0
    picked = tail.gather(0, (labels - 1).clamp_min(0).unsqueeze(0)).squeeze(0) * off_top  # h_y (0 at the top)
    e = tail.neg_().exp_()
    total = class_sum(e).squeeze(0) + 1.0
    nll = (total.log() + picked).sum()
    return nll, e.div_(total)


def _residual_top_zero(tail: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """As _residual_dense for logits [0; -tail]: the NLL sum and the residual of the tail rows only."""
    nll, residual = _softmax_top_zero(tail, labels)
    off_top = labels > 0
    idx = torch.arange(labels.numel(), device=labels.device)
    residual[labels[off_top] - 1, idx[off_top]] -= 1.0
    return nll, residual


def _effective(name: str, params: Params) -> Params:
    """Parameters in the form the analytic pass uses (differentiable in params).

    cms-op: the sorted output tail is -(L B d + L mu) with L the lower-triangular matrix of ones (the
    cumulative sum), so one matrix product per expert replaces a cumulative sum over classes.
    """
    if name == "cms-op":
        weight, bias = params["weight"], params["bias"]
        k = weight.shape[-1]
        lower = torch.tril(torch.ones(k, k, dtype=weight.dtype, device=weight.device))
        return {"weight": lower @ weight, "bias": bias @ lower.T}
    return params


ANALYTIC = ("vs", "vs-ti", "ms", "ms-ti", "dc", "cdc", "cms-ap", "cms-op")


def analytic_block(name: str, eff: Params, features, labels) -> Tuple[torch.Tensor, Params]:
    """NLL sum of one prepared block and its gradient in the effective parameters (float64)."""
    if name in ("vs", "vs-ti"):
        (x,) = features
        x = x.to(torch.float64)
        g = torch.addcmul(eff["bias"][:, None], eff["weight"][:, None], x)
        nll, r = _residual_dense(g, labels)
        return nll, {"weight": (r * x).sum(1), "bias": r.sum(1)}
    if name in ("ms", "ms-ti", "dc"):
        (x,) = features
        x = x.to(torch.float64)
        g = torch.addmm(eff["bias"][:, None], eff["weight"], x)
        nll, r = _residual_dense(g, labels)
        return nll, {"weight": r @ x.T, "bias": r.sum(1)}
    x, counts = features
    x = x.to(torch.float64)
    grad_w = torch.zeros_like(eff["weight"])
    grad_b = torch.zeros_like(eff["bias"])
    nll = x.new_zeros(())
    start = 0
    for k, count in enumerate(counts.tolist()):
        if not count:
            continue
        xk = x[:, start : start + count]
        yk = labels[start : start + count]
        g = torch.addmm(eff["bias"][k][:, None], eff["weight"][k], xk)
        if name == "cdc":
            part, r = _residual_dense(g, yk)
            grad_w[k] = r @ xk.T
            grad_b[k] = r.sum(1)
        else:  # cms-ap / cms-op: logits [0; -g], g >= 0
            part, r = _residual_top_zero(g, yk)
            grad_w[k] = -(r @ xk.T)
            grad_b[k] = -r.sum(1)
        nll = nll + part
        start += count
    return nll, {"weight": grad_w, "bias": grad_b}


class Objective:
    """f(theta) = sum NLL / N + penalty, with its gradient; one pass over `source` per evaluation.

    The linear-in-parameters families use an analytic gradient (softmax residual times features, per
    block, float64); ETS goes through autograd. Either way the gradient reaches theta by autograd through
    the small parameter map only.
    """

    def __init__(self, parametrisation: Parametrisation, source, lambda_reg: float, mu_reg: float, device=None):
        self.par = parametrisation
        self.source = source
        self.lambda_reg = float(lambda_reg)
        self.mu_reg = float(mu_reg)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.evaluations = 0
        self.last_nll = float("nan")

    def __call__(self, theta_np: np.ndarray) -> Tuple[float, np.ndarray]:
        self.evaluations += 1
        name = self.par.name
        theta = torch.tensor(theta_np, dtype=torch.float64, device=self.device, requires_grad=True)
        params = self.par.to_params(theta)
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        count = 0
        if name in ANALYTIC:
            eff = _effective(name, params)
            eff_value = {k: v.detach() for k, v in eff.items()}
            grads = {k: torch.zeros_like(v) for k, v in eff_value.items()}
            for features, labels in self.source.prepared():
                nll, block_grads = analytic_block(name, eff_value, features, labels)
                total += nll
                for key, value in block_grads.items():
                    grads[key] += value
                count += int(labels.numel())
            n = max(count, 1)
            objective = sum((eff[k] * (grads[k] / n)).sum() for k in eff)  # d/dtheta = chain rule
        else:
            family = self.par.family
            objective = theta.new_zeros(())
            for features, labels in self.source.prepared():
                block_params = self.par.to_params(theta)
                g = family.prepared_logits(block_params, _as_float64(features))
                nll = _nll_sum(g, labels)
                nll.backward()
                total += nll.detach()
                count += int(labels.numel())
            n = max(count, 1)
            if theta.grad is not None:
                theta.grad.div_(n)
        reg = penalty(name, params, self.lambda_reg, self.mu_reg)
        to_backward = objective + reg
        if to_backward.requires_grad:
            to_backward.backward()
        grad = theta.grad if theta.grad is not None else torch.zeros_like(theta)
        self.last_nll = float(total) / n
        value = self.last_nll + float(reg.detach())
        return value, grad.detach().cpu().numpy()


def mean_nll(calibrator: Calibrator, raw_blocks: Iterable[Tuple[torch.Tensor, torch.Tensor]]) -> Tuple[float, int]:
    """Mean NLL of the labels under `calibrator` over raw (C, n) blocks, float64 accumulation."""
    total = 0.0
    count = 0
    for z, y in raw_blocks:
        for start in range(0, y.numel(), PREPARED_BLOCK_VOXELS):
            zb = z[:, start : start + PREPARED_BLOCK_VOXELS].to(torch.float64)
            yb = y[start : start + PREPARED_BLOCK_VOXELS]
            g = calibrator.forward(zb)
            total += float(_nll_sum(g, yb))
            count += int(yb.numel())
    return (total / count if count else float("nan")), count


def ts_derivatives(source, beta: float) -> Tuple[float, float, float, int]:
    """Mean NLL of beta*z and its first and second derivative in beta (convex), in one pass.

    Per voxel in float32 (the prepared features are z - max z <= 0, so exp(beta*s) cannot overflow and
    needs no further shift), sums in float64.
    """
    f = d1 = d2 = 0.0
    count = 0
    for (shifted,), labels in source.prepared():
        s = shifted
        e = torch.exp(s * beta)
        es = e * s
        n = labels.numel()
        total = class_sum(e).squeeze(0)
        first = class_sum(es).squeeze(0)
        second = class_sum(es.mul_(s)).squeeze(0)
        mean_s = first / total
        s_label = s.gather(0, labels.unsqueeze(0)).squeeze(0)
        f += float((total.log() - beta * s_label).sum(dtype=torch.float64))
        d1 += float((mean_s - s_label).sum(dtype=torch.float64))
        d2 += float((second / total - mean_s * mean_s).clamp_min(0).sum(dtype=torch.float64))
        count += int(n)
    n = max(count, 1)
    return f / n, d1 / n, d2 / n, count
