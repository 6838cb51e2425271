"""Temperature-scaling artifacts read without torch, for `segcal apply`'s torch-free path.

Why. Temperature scaling is the calibrator most people apply, and its whole forward pass folds into the
softmax as one scale factor, 1/T (`Calibrator.softmax_scale`). `segcal apply` computes that softmax with the
numba kernels from numpy arrays (applying.py), so for a JSON `ts` artifact it needs no torch at all, and
importing torch costs 1.3-1.9 s on this project's machines: as long as the data path itself on a 2 GB file.

`read_softmax_scale` accepts only what `artifact.load_artifact` accepts for a `ts` artifact, and returns None
for anything else (another method, a `.pt` file, a wrong class count, anything malformed): the caller then
loads the artifact the usual way, which also words every error. tests/test_apply_light.py checks both
readers agree.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

FORMAT = "segcal.calibrator"  # artifact.FORMAT (tested equal)
SCHEMA_VERSION = 1  # artifact.SCHEMA_VERSION (tested equal)
TS_PROPERTIES = {"translation_invariant": True, "argmax_preserving": True, "order_preserving": True}


@dataclass(frozen=True)
class SoftmaxScale:
    """A calibrator whose probabilities are softmax(scale * z): what `apply` needs of a temperature scaling."""

    name: str
    num_classes: int
    temperature: float

    def softmax_scale(self) -> float:
        return 1.0 / self.temperature  # as TemperatureScaling.softmax_scale computes it

    def to(self, device) -> "SoftmaxScale":
        return self


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def read_softmax_scale(path, expect_classes: Optional[int] = None) -> Optional[Tuple[SoftmaxScale, dict]]:
    """(calibrator, info) as load_artifact returns them, for a valid JSON `ts` artifact; else None."""
    path = Path(path)
    if path.suffix.lower() != ".json":
        return None
    try:
        raw = path.read_bytes()
        payload = json.loads(raw.decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if not isinstance(payload, dict) or raw[:2] == b"PK":
        return None
    version = payload.get("schema_version")
    num_classes = payload.get("num_classes")
    params = payload.get("parameters")
    properties = payload.get("properties")
    fit_info = payload.get("fit") or {}
    if (payload.get("format") != FORMAT or not _is_int(version) or version != SCHEMA_VERSION
            or payload.get("method") != "ts" or not _is_int(num_classes) or num_classes < 2
            or (expect_classes is not None and num_classes != expect_classes)
            or (properties is not None and properties != TS_PROPERTIES)
            or not isinstance(params, dict) or set(params) != {"temperature"} or not isinstance(fit_info, dict)):
        return None
    temperature = params["temperature"]
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool):
        return None
    temperature = float(temperature)
    if not (math.isfinite(temperature) and temperature > 0):
        return None
    info = {"path": str(path), "format": FORMAT, "schema_version": SCHEMA_VERSION, "method": "ts",
            "num_classes": num_classes, "properties": dict(TS_PROPERTIES), "fit": fit_info}
    return SoftmaxScale("ts", num_classes, temperature), info
