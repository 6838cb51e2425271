"""Calibrator families (theory.md §3-4), their registry, and the artifact format (spec.md).

    from segcal_cli.calibrators import get_method, METHODS, load_artifact, save_artifact
    cal = get_method("ts").from_parameters(19, {"temperature": 1.7})
    calibrated_logits = cal.forward(logits)          # (C, n) -> (C, n)

The names below are imported on first use (PEP 562), so that `segcal_cli.calibrators.softmax_scale`, which
reads temperature-scaling artifacts without torch for `segcal apply`, does not import torch with its package.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "METHODS": "registry",
    "get_method": "registry",
    "load_artifact": "artifact",
    "save_artifact": "artifact",
    "build_payload": "artifact",
    "FORMAT": "artifact",
    "SCHEMA_VERSION": "artifact",
    "Calibrator": "base",
    "Properties": "base",
    "TemperatureScaling": "scaling",
    "EnsembleTemperatureScaling": "scaling",
    "VectorScaling": "affine",
    "VectorScalingTI": "affine",
    "MatrixScaling": "affine",
    "MatrixScalingTI": "affine",
    "DirichletCalibration": "affine",
    "ClassConditionalDirichlet": "experts",
    "ArgmaxPreservingExperts": "experts",
    "OrderPreservingExperts": "experts",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
