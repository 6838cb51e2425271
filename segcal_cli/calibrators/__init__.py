"""Calibrator families (theory.md §3-4), their registry, and the artifact format (spec.md).

    from segcal_cli.calibrators import get_method, METHODS, load_artifact, save_artifact
    cal = get_method("ts").from_parameters(19, {"temperature": 1.7})
    calibrated_logits = cal.forward(logits)          # (C, n) -> (C, n)
"""

from segcal_cli.calibrators.affine import (
    DirichletCalibration,
    MatrixScaling,
    MatrixScalingTI,
    VectorScaling,
    VectorScalingTI,
)
from segcal_cli.calibrators.artifact import FORMAT, SCHEMA_VERSION, build_payload, load_artifact, save_artifact
from segcal_cli.calibrators.base import Calibrator, Properties
from segcal_cli.calibrators.experts import ArgmaxPreservingExperts, ClassConditionalDirichlet, OrderPreservingExperts
from segcal_cli.calibrators.registry import METHODS, get_method
from segcal_cli.calibrators.scaling import EnsembleTemperatureScaling, TemperatureScaling

__all__ = [
    "METHODS",
    "get_method",
    "load_artifact",
    "save_artifact",
    "build_payload",
    "FORMAT",
    "SCHEMA_VERSION",
    "Calibrator",
    "Properties",
    "TemperatureScaling",
    "EnsembleTemperatureScaling",
    "VectorScaling",
    "VectorScalingTI",
    "MatrixScaling",
    "MatrixScalingTI",
    "DirichletCalibration",
    "ClassConditionalDirichlet",
    "ArgmaxPreservingExperts",
    "OrderPreservingExperts",
]
