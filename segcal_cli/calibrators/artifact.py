"""The calibrator artifact (spec.md "Artifact"): JSON or `.pt`, self-describing, validated on load.

JSON stores every parameter as nested lists of Python floats, which `json` writes with `repr` (shortest
round-trip form), so a loaded artifact holds bit-identical float64 parameters. `.pt` holds the same content
with tensors, and is read with `torch.load(weights_only=True)`: anything that needs arbitrary unpickling is
refused. Writes are atomic (temporary name in the target directory, then rename).
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Optional, Tuple

import torch

from segcal_cli.calibrators.base import Calibrator
from segcal_cli.calibrators.registry import get_method
from segcal_cli.errors import InputError
from segcal_cli.io.files import atomic_path

FORMAT = "segcal.calibrator"
SCHEMA_VERSION = 1
JSON_SUFFIXES = (".json",)
TORCH_SUFFIXES = (".pt", ".pth")


def artifact_kind(path) -> str:
    suffix = Path(path).suffix.lower()
    if suffix in JSON_SUFFIXES:
        return "json"
    if suffix in TORCH_SUFFIXES:
        return "pt"
    raise InputError(f"calibrator output must end in .json or .pt, not {Path(path).name!r}", source=str(path))


def build_payload(cal: Calibrator, fit_info: Optional[dict] = None) -> dict:
    return {
        "format": FORMAT,
        "schema_version": SCHEMA_VERSION,
        "method": cal.name,
        "num_classes": cal.num_classes,
        "properties": cal.properties.as_dict(),
        "parameters": cal.parameters(),
        "fit": dict(fit_info or {}),
    }


def _jsonable(value):
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return value.item()
    return value


def _ptable(value):
    """Only what torch's weights_only loader accepts: tensors, primitives, lists, dicts."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {str(k): _ptable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_ptable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    return str(value)


def check_destination(path, source: Optional[str] = None) -> str:
    """The artifact kind of `path` ("json" | "pt"); InputError for another suffix or a missing directory.
    `segcal fit` calls it before reading any data, save_artifact again before writing."""
    path = Path(path)
    kind = artifact_kind(path)
    if not path.parent.is_dir():
        raise InputError(f"output directory {str(path.parent)!r} does not exist", source=source or str(path))
    return kind


def save_artifact(cal: Calibrator, path, fit_info: Optional[dict] = None) -> Path:
    """Write the artifact atomically; the format follows the suffix (.json, .pt)."""
    path = Path(path)
    kind = check_destination(path)
    payload = build_payload(cal, fit_info)
    if kind == "json":
        data = (json.dumps(_jsonable(payload), indent=1, allow_nan=False) + "\n").encode()
    else:
        buffer = io.BytesIO()
        torch.save(_ptable(payload), buffer)
        data = buffer.getvalue()
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return path


def _read_payload(path: Path) -> dict:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise InputError("calibrator file not found", source=str(path)) from None
    except IsADirectoryError:
        raise InputError("calibrator path is a directory, not a file", source=str(path)) from None
    except OSError as err:
        raise InputError(f"cannot read calibrator: {err.strerror or err}", source=str(path)) from None
    if not raw:
        raise InputError("calibrator file is empty", source=str(path))
    if raw[:2] == b"PK" or path.suffix.lower() in TORCH_SUFFIXES:
        try:
            payload = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises several types for corrupt / unsafe files
            text = str(err)
            if "weights_only" in text or "Unsupported global" in text or "unpickl" in text.lower():
                raise InputError(
                    "refused: this .pt file holds pickled objects other than tensors and plain values "
                    "(loading it would run arbitrary code)",
                    source=str(path),
                ) from None
            raise InputError("not a readable .pt calibrator (truncated or corrupt file)", source=str(path)) from None
    else:
        try:
            payload = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise InputError(
                f"not a valid JSON calibrator (truncated or corrupt file: {err.__class__.__name__} at byte "
                f"{getattr(err, 'pos', getattr(err, 'start', '?'))})",
                source=str(path),
            ) from None
    if not isinstance(payload, dict):
        raise InputError(f"not a segcal calibrator: top level is a {type(payload).__name__}, not an object", source=str(path))
    return payload


def load_artifact(path, expect_classes: Optional[int] = None) -> Tuple[Calibrator, dict]:
    """Read and validate an artifact; returns (calibrator, info). InputError on anything wrong."""
    path = Path(path)
    payload = _read_payload(path)
    where = str(path)
    fmt = payload.get("format")
    if fmt != FORMAT:
        raise InputError(f"not a segcal calibrator (format {fmt!r}, expected {FORMAT!r})", source=where)
    version = payload.get("schema_version")
    if isinstance(version, torch.Tensor):
        version = version.item()
    if version != SCHEMA_VERSION or isinstance(version, bool):
        raise InputError(
            f"unknown calibrator schema version {version!r} (this segcal reads version {SCHEMA_VERSION})", source=where
        )
    method = payload.get("method")
    try:
        cls = get_method(method)
    except InputError as err:
        raise InputError(str(err), source=where) from None
    num_classes = payload.get("num_classes")
    if isinstance(num_classes, torch.Tensor):
        num_classes = num_classes.item()
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 2:
        raise InputError(f"num_classes must be an integer >= 2, got {num_classes!r}", source=where)
    if expect_classes is not None and num_classes != expect_classes:
        raise InputError(
            f"calibrator is for {num_classes} classes but the data has {expect_classes}", source=where
        )
    properties = payload.get("properties")
    if properties is not None and properties != cls.properties.as_dict():
        raise InputError(
            f"declared properties {properties!r} do not match method {method!r} ({cls.properties.as_dict()!r})",
            source=where,
        )
    params = payload.get("parameters")
    if not isinstance(params, dict):
        raise InputError("artifact has no 'parameters' mapping", source=where)
    cal = cls.from_parameters(num_classes, params, where=where)
    fit_info = payload.get("fit") or {}
    if not isinstance(fit_info, dict):
        raise InputError("artifact 'fit' block must be a mapping", source=where)
    info = {
        "path": where,
        "format": FORMAT,
        "schema_version": SCHEMA_VERSION,
        "method": cls.name,
        "num_classes": num_classes,
        "properties": cls.properties.as_dict(),
        "fit": fit_info,
    }
    return cal, info
