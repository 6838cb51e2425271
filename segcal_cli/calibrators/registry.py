"""The one registry of calibrator families that `segcal fit --method` and `segcal methods` read."""

from __future__ import annotations

from typing import Dict, Type

from segcal_cli.calibrators.affine import (
    DirichletCalibration,
    MatrixScaling,
    MatrixScalingTI,
    VectorScaling,
    VectorScalingTI,
)
from segcal_cli.calibrators.base import Calibrator
from segcal_cli.calibrators.experts import ArgmaxPreservingExperts, ClassConditionalDirichlet, OrderPreservingExperts
from segcal_cli.calibrators.scaling import EnsembleTemperatureScaling, TemperatureScaling
from segcal_cli.errors import InputError

# Order as spec.md lists them.
METHODS: Dict[str, Type[Calibrator]] = {
    cls.name: cls
    for cls in (
        TemperatureScaling,
        VectorScaling,
        VectorScalingTI,
        MatrixScaling,
        MatrixScalingTI,
        DirichletCalibration,
        EnsembleTemperatureScaling,
        ClassConditionalDirichlet,
        ArgmaxPreservingExperts,
        OrderPreservingExperts,
    )
}


def get_method(name: str) -> Type[Calibrator]:
    """The family called `name`; InputError listing the known names otherwise."""
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        raise InputError(f"unknown method {name!r}; known methods: {', '.join(METHODS)}") from None
