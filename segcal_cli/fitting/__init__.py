"""Fitting (theory.md §5): objective (NLL + ODIR penalty), solvers, reproducible voxel sampling, driver.

    from segcal_cli.fitting import fit_tensors
    result = fit_tensors("ts", logits, labels)        # logits (C, N), labels (N,)
    result.calibrator.forward(logits); result.report["gradient_norm"]
"""

from segcal_cli.fitting.driver import (
    DEFAULT_MAX_VOXELS,
    DEFAULT_REGULARISATION,
    FitOptions,
    FitResult,
    fit_dataset,
    fit_tensors,
    split_cases,
)

__all__ = ["DEFAULT_MAX_VOXELS", "DEFAULT_REGULARISATION", "FitOptions", "FitResult", "fit_dataset", "fit_tensors",
           "split_cases"]
