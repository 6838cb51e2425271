"""Global affine families: `vs`, `vs-ti`, `ms`, `ms-ti`, `dc` (theory.md §3).

`vs` and `ms` act on the raw logits and are therefore NOT translation invariant (that is the point of
having them: they are the shift-sensitive parents). `vs-ti` and `dc` act on the canonical `ell = log S(z)`;
`ms-ti` constrains every row of W to one shared sum, so a shift adds a per-voxel constant only.
"""

from __future__ import annotations

import torch

from segcal_cli.calibrators.base import Calibrator, Properties, compute_dtype, log_softmax_classes_first
from segcal_cli.errors import InputError


class _Affine(Calibrator):
    """An affine map of per-family features of z (z itself, log S(z), z - max z); the fit precomputes the
    features once (`prepare`) and evaluates `prepared_logits` on them, `forward` does both."""

    @classmethod
    def _features(cls, z):
        raise NotImplementedError

    @classmethod
    def _map(cls, params, z):
        return cls.prepared_logits(params, (cls._features(z),))

    @classmethod
    def prepare(cls, z, labels):
        return (cls._features(z.to(compute_dtype(z))),), labels


class _Diagonal(_Affine):
    @classmethod
    def parameter_shapes(cls, num_classes):
        return {"weight": (num_classes,), "bias": (num_classes,)}

    @classmethod
    def _identity(cls, num_classes):
        return {"weight": torch.ones(num_classes, dtype=torch.float64), "bias": torch.zeros(num_classes, dtype=torch.float64)}

    @classmethod
    def _random(cls, num_classes, generator):
        weight = (0.4 * torch.randn(num_classes, dtype=torch.float64, generator=generator)).exp()
        bias = 0.5 * torch.randn(num_classes, dtype=torch.float64, generator=generator)
        return {"weight": weight, "bias": bias}

    @classmethod
    def prepared_logits(cls, params, features):
        return torch.addcmul(params["bias"][:, None], params["weight"][:, None], features[0])


class VectorScaling(_Diagonal):
    name = "vs"
    description = "vector scaling w*z+b on raw logits (shift-sensitive parent)"
    properties = Properties(translation_invariant=False, argmax_preserving=False, order_preserving=False)

    @classmethod
    def _features(cls, z):
        return z


class VectorScalingTI(_Diagonal):
    name = "vs-ti"
    description = "vector scaling on log S(z) (diagonal Dirichlet)"
    properties = Properties(translation_invariant=True, argmax_preserving=False, order_preserving=False)

    @classmethod
    def _features(cls, z):
        return log_softmax_classes_first(z)


class _Matrix(_Affine):
    @classmethod
    def parameter_shapes(cls, num_classes):
        return {"weight": (num_classes, num_classes), "bias": (num_classes,)}

    @classmethod
    def _identity(cls, num_classes):
        return {"weight": torch.eye(num_classes, dtype=torch.float64), "bias": torch.zeros(num_classes, dtype=torch.float64)}

    @classmethod
    def _random(cls, num_classes, generator):
        weight = torch.eye(num_classes, dtype=torch.float64) * (
            0.3 * torch.randn(num_classes, dtype=torch.float64, generator=generator)
        ).exp() + 0.2 * torch.randn(num_classes, num_classes, dtype=torch.float64, generator=generator)
        bias = 0.5 * torch.randn(num_classes, dtype=torch.float64, generator=generator)
        return {"weight": weight, "bias": bias}

    @classmethod
    def prepared_logits(cls, params, features):
        return torch.addmm(params["bias"][:, None], params["weight"], features[0])


class MatrixScaling(_Matrix):
    name = "ms"
    description = "matrix scaling Wz+b on raw logits (shift-sensitive parent)"
    properties = Properties(translation_invariant=False, argmax_preserving=False, order_preserving=False)

    @classmethod
    def _features(cls, z):
        return z


# Relative tolerance on "every row of W sums to the same s": a fitted W is built with exactly equal row
# sums in float64, and the JSON artifact round-trips exactly, so only rounding of the construction remains.
ROW_SUM_RTOL = 1e-9


class MatrixScalingTI(_Matrix):
    name = "ms-ti"
    description = "matrix scaling, rows of W share one sum (paper: MSc)"
    properties = Properties(translation_invariant=True, argmax_preserving=False, order_preserving=False)

    @classmethod
    def _features(cls, z):
        # W (z - max z) differs from W z by (max z) * s * 1, a per-voxel constant: same probabilities,
        # and the shift cancels before the matmul instead of after it (exact TI in floating point).
        return z - z.amax(0, keepdim=True)

    @classmethod
    def _random(cls, num_classes, generator):
        params = super()._random(num_classes, generator)
        weight = params["weight"]
        row_sums = weight.sum(1, keepdim=True)
        params["weight"] = weight - (row_sums - row_sums.mean()) / num_classes
        return params

    @classmethod
    def _check(cls, num_classes, params, where):
        weight = params["weight"]
        row_sums = weight.sum(1)
        spread = float(row_sums.max() - row_sums.min())
        scale = max(1.0, float(weight.abs().max())) * num_classes
        if spread > ROW_SUM_RTOL * scale:
            raise InputError(
                f"{where}: ms-ti weight rows must all sum to the same value (spread {spread:.3g}); "
                "this calibrator would not be translation invariant"
            )


class DirichletCalibration(_Matrix):
    name = "dc"
    description = "Dirichlet calibration W log S(z)+b"
    properties = Properties(translation_invariant=True, argmax_preserving=False, order_preserving=False)

    @classmethod
    def _features(cls, z):
        return log_softmax_classes_first(z)
