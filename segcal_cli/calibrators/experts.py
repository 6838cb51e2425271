"""Class-conditional ("expert") families: `cdc`, `cms-ap`, `cms-op` (theory.md §4).

Each voxel goes to expert k = argmax z (ties: lowest index, as `torch.max` returns). All three read only
differences of logits (or `ell = log S(z)`), so they are translation invariant. Parameters grow as O(C^3).

Forward passes group the voxels of a block by expert (one gather/scatter per expert, no per-voxel matrices).
For fitting, `prepare` sorts a block's voxels by expert once and precomputes the expert's features and the
label's position in the expert's output order, so a loss evaluation is C small matmuls per block.
"""

from __future__ import annotations

from typing import List, Tuple

import torch

from segcal_cli.calibrators.base import Calibrator, Properties, compute_dtype, log_softmax_classes_first
from segcal_cli.errors import InputError


def _sort_by_expert(experts: torch.Tensor, num_classes: int):
    """Permutation that makes each expert's voxels contiguous, and the per-expert counts (a CPU list)."""
    order = torch.sort(experts, stable=True).indices
    counts = torch.bincount(experts, minlength=num_classes).tolist()
    return order, counts


def _expert_groups(experts: torch.Tensor, num_classes: int) -> List[Tuple[int, torch.Tensor]]:
    """(k, voxel indices routed to k) for the experts present in the block."""
    order, counts = _sort_by_expert(experts, num_classes)
    groups, start = [], 0
    for k, count in enumerate(counts):
        if count:
            groups.append((k, order[start : start + count]))
        start += count
    return groups


def _counts_tensor(counts: List[int], device) -> torch.Tensor:
    return torch.tensor(counts, dtype=torch.int64, device=device)


def _split(features: torch.Tensor, counts: torch.Tensor):
    return torch.split(features, counts.tolist(), dim=-1)


def _per_expert_logits(params, features, finish) -> torch.Tensor:
    """prepared_logits of every family here: prepared features (sorted by expert, with the counts) through
    each expert's affine map, `finish` turning the mapped block into that family's logits."""
    values, counts = features
    parts = []
    for k, block in enumerate(_split(values, counts)):
        if block.shape[1]:
            parts.append(finish(torch.addmm(params["bias"][k][:, None], params["weight"][k], block)))
    return torch.cat(parts, dim=1)


class ClassConditionalDirichlet(Calibrator):
    name = "cdc"
    description = "class-conditional Dirichlet, one expert per argmax; O(C^3)"
    properties = Properties(translation_invariant=True, argmax_preserving=False, order_preserving=False)

    @classmethod
    def parameter_shapes(cls, num_classes):
        c = num_classes
        return {"weight": (c, c, c), "bias": (c, c)}

    @classmethod
    def _identity(cls, num_classes):
        c = num_classes
        return {
            "weight": torch.eye(c, dtype=torch.float64).expand(c, c, c).clone(),
            "bias": torch.zeros(c, c, dtype=torch.float64),
        }

    @classmethod
    def _random(cls, num_classes, generator):
        c = num_classes
        weight = torch.eye(c, dtype=torch.float64) * (
            0.3 * torch.randn(c, 1, c, dtype=torch.float64, generator=generator)
        ).exp() + 0.2 * torch.randn(c, c, c, dtype=torch.float64, generator=generator)
        bias = 0.5 * torch.randn(c, c, dtype=torch.float64, generator=generator)
        return {"weight": weight, "bias": bias}

    @classmethod
    def _map(cls, params, z):
        num_classes = z.shape[0]
        top = z.max(0)
        ell = log_softmax_classes_first(z)
        out = torch.empty_like(ell)
        for k, idx in _expert_groups(top.indices, num_classes):
            block = ell.index_select(1, idx)
            out.index_copy_(1, idx, torch.addmm(params["bias"][k][:, None], params["weight"][k], block))
        return out

    @classmethod
    def prepare(cls, z, labels):
        z = z.to(compute_dtype(z))
        num_classes = z.shape[0]
        order, counts = _sort_by_expert(z.max(0).indices, num_classes)
        ell = log_softmax_classes_first(z.index_select(1, order))
        return (ell, _counts_tensor(counts, "cpu")), labels.index_select(0, order)

    @classmethod
    def prepared_logits(cls, params, features):
        return _per_expert_logits(params, features, lambda mapped: mapped)


def _check_non_negative(name: str, params, where: str) -> None:
    for key in ("weight", "bias"):
        value = params[key]
        if bool((value < 0).any()):
            raise InputError(
                f"{where}: {name} parameter {key!r} must be >= 0 (min {float(value.min())!r}); "
                "a negative entry breaks its decision guarantee"
            )


def _competitors(num_classes: int, k: int) -> List[int]:
    return [j for j in range(num_classes) if j != k]


class _NonNegativeExperts(Calibrator):
    """Shared by cms-ap / cms-op: per expert B_k (C-1)x(C-1) >= 0 ("weight") and mu_k (C-1) >= 0 ("bias")."""

    @classmethod
    def parameter_shapes(cls, num_classes):
        c = num_classes
        return {"weight": (c, c - 1, c - 1), "bias": (c, c - 1)}

    @classmethod
    def _identity(cls, num_classes):
        c = num_classes
        return {
            "weight": torch.eye(c - 1, dtype=torch.float64).expand(c, c - 1, c - 1).clone(),
            "bias": torch.zeros(c, c - 1, dtype=torch.float64),
        }

    @classmethod
    def _random(cls, num_classes, generator):
        c = num_classes
        diag = torch.empty(c, c - 1, dtype=torch.float64).uniform_(0.3, 2.0, generator=generator)
        weight = torch.diag_embed(diag) + 0.15 * torch.rand(c, c - 1, c - 1, dtype=torch.float64, generator=generator)
        bias = 0.5 * torch.rand(c, c - 1, dtype=torch.float64, generator=generator)
        return {"weight": weight, "bias": bias}

    @classmethod
    def _check(cls, num_classes, params, where):
        _check_non_negative(cls.name, params, where)


class ArgmaxPreservingExperts(_NonNegativeExperts):
    name = "cms-ap"
    description = "class-conditional, non-negative margins to the top; O(C^3)"
    properties = Properties(translation_invariant=True, argmax_preserving=True, order_preserving=False)

    @staticmethod
    def _embedded(params, num_classes: int):
        """B_k and mu_k placed in C x C / C with zero row and column k (the top class keeps g_k = 0)."""
        weight, bias = params["weight"], params["bias"]
        c = num_classes
        full_w = weight.new_zeros(c, c, c)
        full_b = bias.new_zeros(c, c)
        for k in range(c):
            comp = torch.tensor(_competitors(c, k), device=weight.device)
            full_w[k][comp[:, None], comp[None, :]] = weight[k]
            full_b[k][comp] = bias[k]
        return full_w, full_b

    @classmethod
    def _map(cls, params, z):
        num_classes = z.shape[0]
        top = z.max(0)
        # Margins to the top logit: >= 0 exactly in floating point, and the per-voxel offset cancels.
        margins = top.values.unsqueeze(0) - z
        full_w, full_b = cls._embedded(params, num_classes)
        out = torch.empty_like(z)
        for k, idx in _expert_groups(top.indices, num_classes):
            block = margins.index_select(1, idx)
            out.index_copy_(1, idx, torch.addmm(full_b[k][:, None], full_w[k], block).neg_())
        return out

    @classmethod
    def prepare(cls, z, labels):
        z = z.to(compute_dtype(z))
        num_classes = z.shape[0]
        top = z.max(0)
        order, counts = _sort_by_expert(top.indices, num_classes)
        z = z.index_select(1, order)
        labels = labels.index_select(0, order)
        experts = top.indices.index_select(0, order)
        margins = top.values.index_select(0, order).unsqueeze(0) - z
        # Row 0 of the prepared output is the top class; rows 1.. are the competitors in class order.
        # Competitor j of expert k sits at row j + 1 when j < k and at row j when j > k.
        position = torch.where(labels == experts, 0, torch.where(labels < experts, labels + 1, labels))
        # Competitor margins per expert, rows in class order without the expert's own row.
        competitor_rows = torch.empty(num_classes - 1, z.shape[1], dtype=z.dtype, device=z.device)
        start = 0
        for k, count in enumerate(counts):
            if count:
                comp = torch.tensor(_competitors(num_classes, k), device=z.device)
                competitor_rows[:, start : start + count] = margins[:, start : start + count].index_select(0, comp)
            start += count
        return (competitor_rows, _counts_tensor(counts, "cpu")), position

    @classmethod
    def prepared_logits(cls, params, features):
        # the top class at 0, the competitors at minus their new margins
        return _per_expert_logits(params, features, lambda new_margins: torch.cat(
            [new_margins.new_zeros(1, new_margins.shape[1]), -new_margins], dim=0))


class OrderPreservingExperts(_NonNegativeExperts):
    name = "cms-op"
    description = "class-conditional, non-negative rank gaps; O(C^3)"
    properties = Properties(translation_invariant=True, argmax_preserving=True, order_preserving=True)

    @classmethod
    def _map(cls, params, z):
        num_classes = z.shape[0]
        ranked = torch.sort(z, dim=0, descending=True, stable=True)
        gaps = ranked.values[:-1] - ranked.values[1:]
        experts = ranked.indices[0]
        sorted_out = torch.empty_like(z)
        sorted_out[0] = 0
        for k, idx in _expert_groups(experts, num_classes):
            block = gaps.index_select(1, idx)
            new_gaps = torch.addmm(params["bias"][k][:, None], params["weight"][k], block)
            # Cumulative sums of non-negative gaps are monotone in floating point: the ranking survives.
            sorted_out[1:].index_copy_(1, idx, torch.cumsum(new_gaps, dim=0).neg_())
        return torch.empty_like(z).scatter_(0, ranked.indices, sorted_out)

    @classmethod
    def prepare(cls, z, labels):
        z = z.to(compute_dtype(z))
        num_classes = z.shape[0]
        ranked = torch.sort(z, dim=0, descending=True, stable=True)
        order, counts = _sort_by_expert(ranked.indices[0], num_classes)
        values = ranked.values.index_select(1, order)
        ranks = ranked.indices.index_select(1, order)
        labels = labels.index_select(0, order)
        gaps = values[:-1] - values[1:]
        # The label's rank position: prepared output rows are in rank order.
        position = (ranks == labels.unsqueeze(0)).to(torch.int8).max(0).indices
        return (gaps, _counts_tensor(counts, "cpu")), position

    @classmethod
    def prepared_logits(cls, params, features):
        # in rank order: the top at 0, each next one lower by the cumulated new gaps
        return _per_expert_logits(params, features, lambda new_gaps: torch.cat(
            [new_gaps.new_zeros(1, new_gaps.shape[1]), -torch.cumsum(new_gaps, dim=0)], dim=0))
