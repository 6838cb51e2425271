"""Temperature scaling (`ts`) and ensemble temperature scaling (`ets`), theory.md §3."""

from __future__ import annotations

import math

import torch

from segcal_cli.calibrators.base import Calibrator, Params, Properties, log_softmax_classes_first
from segcal_cli.errors import InputError


def _check_temperature(name: str, params: Params, where: str) -> None:
    temperature = float(params["temperature"])
    if not temperature > 0:
        raise InputError(f"{where}: {name} temperature must be > 0, got {temperature!r}")


class TemperatureScaling(Calibrator):
    name = "ts"
    description = "temperature scaling z/T"
    properties = Properties(translation_invariant=True, argmax_preserving=True, order_preserving=True)

    @classmethod
    def parameter_shapes(cls, num_classes):
        return {"temperature": ()}

    @classmethod
    def _identity(cls, num_classes):
        return {"temperature": torch.tensor(1.0, dtype=torch.float64)}

    @classmethod
    def _random(cls, num_classes, generator):
        log_t = torch.empty((), dtype=torch.float64).uniform_(-1.2, 1.6, generator=generator)
        return {"temperature": log_t.exp()}

    @classmethod
    def _check(cls, num_classes, params, where):
        _check_temperature(cls.name, params, where)

    @classmethod
    def _map(cls, params, z):
        # (z - max z) / T: the same probabilities as z / T, with the top class at exactly 0, so the
        # argmax survives float rounding and large offsets do not cost precision.
        return (z - z.amax(0, keepdim=True)) / params["temperature"]

    @property
    def temperature(self) -> float:
        return float(self._params["temperature"])

    def softmax_scale(self) -> float | None:
        return 1.0 / self.temperature


class EnsembleTemperatureScaling(Calibrator):
    name = "ets"
    description = "ensemble TS: w0 S(z/T) + w1 S(z) + w2/C, w on the simplex"
    properties = Properties(translation_invariant=True, argmax_preserving=True, order_preserving=True)

    @classmethod
    def parameter_shapes(cls, num_classes):
        return {"temperature": (), "weights": (3,)}

    @classmethod
    def _identity(cls, num_classes):
        return {
            "temperature": torch.tensor(1.0, dtype=torch.float64),
            "weights": torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64),
        }

    @classmethod
    def _random(cls, num_classes, generator):
        log_t = torch.empty((), dtype=torch.float64).uniform_(-1.2, 1.6, generator=generator)
        raw = torch.rand(3, dtype=torch.float64, generator=generator) + 0.05
        return {"temperature": log_t.exp(), "weights": raw / raw.sum()}

    @classmethod
    def _check(cls, num_classes, params, where):
        _check_temperature(cls.name, params, where)
        weights = params["weights"]
        if bool((weights < 0).any()):
            raise InputError(f"{where}: ets weights must be >= 0, got {weights.tolist()}")
        total = float(weights.sum())
        if abs(total - 1.0) > 1e-9:
            raise InputError(f"{where}: ets weights must sum to 1, got {total!r}")

    @classmethod
    def _map(cls, params, z):
        return cls._mixture_log_probs(params["temperature"], params["weights"], z - z.amax(0, keepdim=True))

    @staticmethod
    def _mixture_log_probs(temperature, weights, shifted):
        """log(w0 S(s/T) + w1 S(s) + w2/C), computed in log space with one shared per-voxel shift.

        Every step is monotone in each class's logit, so the ranking survives rounding; where all
        three terms underflow, the largest log-term is the correct limit.
        """
        num_classes = shifted.shape[0]
        log_w = torch.log(weights)
        scaled = log_softmax_classes_first(shifted / temperature) + log_w[0]
        plain = log_softmax_classes_first(shifted) + log_w[1]
        uniform = log_w[2] - math.log(num_classes)
        top = torch.maximum(torch.maximum(scaled.amax(0, keepdim=True), plain.amax(0, keepdim=True)), uniform)
        total = (scaled - top).exp() + (plain - top).exp() + (uniform - top).exp()
        mixed = top + total.log()
        largest = torch.maximum(torch.maximum(scaled, plain), uniform)
        return torch.maximum(mixed, largest)

    @classmethod
    def prepared_logits(cls, params, features):
        return cls._mixture_log_probs(params["temperature"], params["weights"], features[0])

