"""The calibrator protocol shared by every family (theory.md §3-4).

A calibrator maps a classes-first block of logits `(C, n)` to calibrated logits `(C, n)`; calibrated
probabilities are their softmax. Calibrated logits are defined up to a per-voxel constant (the softmax
gauge): several families return a gauge that keeps the top class at or near 0, which is numerically kinder
and keeps decision guarantees exact in floating point.

Each family provides three things:
* `_map(params, z)`: the forward map, differentiable, on parameters cast to z's dtype and device;
* `_check(C, params)`: family constraints for `from_parameters` (signs, simplex, equal row sums);
* `_identity(C)` / `_random(C, generator)`: parameter dictionaries.
Fitting uses `prepare` / `prepared_logits` (features that do not depend on the parameters, computed once
per sample) so every loss evaluation is a small number of dense ops per block.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import ClassVar, Dict, Optional, Tuple

import torch

from segcal_cli.errors import InputError

Params = Dict[str, torch.Tensor]


@dataclass(frozen=True)
class Properties:
    """What a family guarantees for every parameter value (theory.md §3)."""

    translation_invariant: bool
    argmax_preserving: bool
    order_preserving: bool

    def as_dict(self) -> dict:
        return asdict(self)


def compute_dtype(z: torch.Tensor) -> torch.dtype:
    """float64 stays float64; everything else (float16, bfloat16, float32) is computed in float32."""
    return torch.float64 if z.dtype == torch.float64 else torch.float32


def class_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over the class axis 0 of a (C, n) block, as a (1, n) row.

    A matrix product with a row of ones: on CPU, `x.sum(0)` over the leading axis of a classes-first block
    ran ~100x slower here than this BLAS call (strided reduction vs. a vectorised gemv).
    """
    return torch.ones(1, x.shape[0], dtype=x.dtype, device=x.device) @ x


def log_softmax_classes_first(z: torch.Tensor) -> torch.Tensor:
    """ell = z - logsumexp(z) over the class axis 0, without a transpose."""
    top = z.amax(0, keepdim=True)
    shifted = z - top
    return shifted - class_sum(shifted.exp()).log()


class Calibrator:
    """Base class: one instance = one family + fitted (or given) parameters for C classes."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    properties: ClassVar[Properties]

    # ----------------------------------------------------------------- family description
    @classmethod
    def parameter_shapes(cls, num_classes: int) -> Dict[str, Tuple[int, ...]]:
        raise NotImplementedError

    @classmethod
    def num_parameters(cls, num_classes: int) -> int:
        """Numbers stored in the artifact (the `parameters` block)."""
        return sum(math.prod(shape) for shape in cls.parameter_shapes(num_classes).values())

    @classmethod
    def min_classes(cls) -> int:
        return 2

    # ----------------------------------------------------------------- constructors
    def __init__(self, num_classes: int, params: Params):
        """Trusted constructor (parameters already validated); use from_parameters for outside data."""
        self.num_classes = int(num_classes)
        self._params: Params = {k: v.detach().to(torch.float64) for k, v in params.items()}
        self._cast_cache: Dict[Tuple[torch.dtype, torch.device], Params] = {}

    @classmethod
    def identity(cls, num_classes: int) -> "Calibrator":
        cls._check_classes(num_classes)
        return cls(num_classes, cls._identity(num_classes))

    @classmethod
    def random(cls, num_classes: int, generator: Optional[torch.Generator] = None) -> "Calibrator":
        """Random valid parameters around the identity (for audits and property tests)."""
        cls._check_classes(num_classes)
        if generator is None:
            generator = torch.Generator().manual_seed(0)
        params = cls._random(num_classes, generator)
        return cls.from_parameters(num_classes, params)

    @classmethod
    def from_parameters(cls, num_classes: int, params: dict, *, where: str = "parameters") -> "Calibrator":
        """Validate names, shapes, finiteness and family constraints; InputError naming what is wrong."""
        cls._check_classes(num_classes, where=where)
        shapes = cls.parameter_shapes(num_classes)
        if not isinstance(params, dict):
            raise InputError(f"{where}: expected a mapping of named arrays, got {type(params).__name__}")
        missing = [k for k in shapes if k not in params]
        extra = [k for k in params if k not in shapes]
        if missing or extra:
            detail = []
            if missing:
                detail.append(f"missing {', '.join(missing)}")
            if extra:
                detail.append(f"unexpected {', '.join(map(str, extra))}")
            raise InputError(f"{where}: {cls.name} expects parameters {', '.join(shapes)} ({'; '.join(detail)})")
        checked: Params = {}
        for key, shape in shapes.items():
            value = params[key]
            try:
                tensor = torch.as_tensor(value, dtype=torch.float64)
            except (TypeError, ValueError, RuntimeError) as err:
                raise InputError(f"{where}: {cls.name} parameter {key!r} is not a numeric array ({err})") from None
            if tuple(tensor.shape) != tuple(shape):
                raise InputError(
                    f"{where}: {cls.name} parameter {key!r} has shape {tuple(tensor.shape)}, expected {tuple(shape)} "
                    f"for {num_classes} classes"
                )
            if not bool(torch.isfinite(tensor).all()):
                raise InputError(f"{where}: {cls.name} parameter {key!r} holds NaN or infinite values")
            checked[key] = tensor.cpu().clone()
        cls._check(num_classes, checked, where)
        return cls(num_classes, checked)

    @classmethod
    def _check_classes(cls, num_classes, where: str = "calibrator") -> None:
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < cls.min_classes():
            raise InputError(f"{where}: {cls.name} needs an integer class count >= {cls.min_classes()}, got {num_classes!r}")

    # ----------------------------------------------------------------- family hooks
    @classmethod
    def _identity(cls, num_classes: int) -> Params:
        raise NotImplementedError

    @classmethod
    def _random(cls, num_classes: int, generator: torch.Generator) -> Params:
        raise NotImplementedError

    @classmethod
    def _check(cls, num_classes: int, params: Params, where: str) -> None:
        """Family constraints beyond shape and finiteness."""

    @classmethod
    def _map(cls, params: Params, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # ----------------------------------------------------------------- fitting hooks
    @classmethod
    def prepare(cls, z: torch.Tensor, labels: torch.Tensor) -> Tuple[Tuple[torch.Tensor, ...], torch.Tensor]:
        """Parameter-free features of a block and the labels re-indexed to match `prepared_logits`.

        Default: the centred logits (z - max z), float32. Families override it.
        """
        z = z.to(compute_dtype(z))
        return (z - z.amax(0, keepdim=True),), labels

    @classmethod
    def prepared_logits(cls, params: Params, features: Tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Calibrated logits `(K, n)` from prepared features (float64 params); `K` columns align with labels."""
        return cls._map(params, features[0])

    # ----------------------------------------------------------------- instance API
    def parameters(self) -> Params:
        """Named float64 CPU tensors: what the artifact stores."""
        return {k: v.detach().cpu().clone() for k, v in self._params.items()}

    def to(self, device) -> "Calibrator":
        device = torch.device(device)
        self._params = {k: v.to(device) for k, v in self._params.items()}
        self._cast_cache.clear()
        return self

    @property
    def device(self) -> torch.device:
        return next(iter(self._params.values())).device

    def _cast(self, dtype: torch.dtype, device: torch.device) -> Params:
        key = (dtype, device)
        cached = self._cast_cache.get(key)
        if cached is None:
            cached = {k: v.to(device=device, dtype=dtype) for k, v in self._params.items()}
            self._cast_cache[key] = cached
        return cached

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        """Calibrated logits for a classes-first block `(C, n)` (any trailing shape works for most families)."""
        if logits.dim() < 1 or logits.shape[0] != self.num_classes:
            raise InputError(
                f"{self.name} calibrator for {self.num_classes} classes got logits with {logits.shape[0] if logits.dim() else 0} classes"
            )
        dtype = compute_dtype(logits)
        shape = logits.shape
        z = logits.to(dtype).reshape(shape[0], -1)
        with torch.no_grad():
            return self._map(self._cast(dtype, z.device), z).reshape(shape)

    __call__ = forward

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.forward(logits), dim=0)

    def softmax_scale(self) -> float | None:
        """s > 0 when the calibrated probabilities are softmax(s * z) for every input z (temperature scaling),
        so a softmax can fold s into its own arithmetic instead of running `forward` first (segcal apply);
        None for every family that is not a pure rescaling."""
        return None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} C={self.num_classes}>"
