"""Synthetic segmentation cases with a KNOWN true posterior (numpy only, deterministic for a seed).

The generative model, per case (theory.md §1 notation):

1. True class scores ``z*(x)`` (C, *spatial): smooth random fields plus a per-class prior (class
   imbalance) and, for the presets, a scene layout (street: classes favoured by image row; brain: nested
   shells around a tumour centre).
2. The TRUE posterior ``p* = S(z*)``. Labels are drawn independently per voxel, ``y ~ Categorical(p*)``,
   so ``p*`` is exactly calibrated with respect to the labels.
3. The "model" logits are a documented miscalibration of ``z*``::

       logits = (z* + boundary_noise · w(x) · e(x)) / T  +  class_bias  +  c(x)·1

   * ``1/T`` with ``T < 1``: overconfidence;
   * ``class_bias`` (C,): a class-dependent bias (rare classes under-predicted);
   * ``w(x) = exp(-margin*(x) / boundary_width)`` where ``margin*`` is the top-2 gap of ``z*``, and ``e``
     are smooth unit-variance noise fields: errors concentrated at region boundaries (argmax flips and
     wrong confidences exactly where the true posterior is uncertain);
   * ``c(x)``: a smooth per-voxel offset added to every class, with spatial mean ``offset_mean`` and spatial
     standard deviation exactly ``offset_std``. It changes nothing in the softmax, but shift-sensitive
     calibrators (vs, ms) see it, and translation-invariant ones do not.

Each component draws from its own child of ``SeedSequence(seed)``, so changing one parameter (say
``offset_std``) leaves every other component bit-for-bit unchanged.

``implied_metrics(logits, posterior)`` gives the population calibration metrics the generator implies for
any logits, without label-sampling noise: the probability that the predicted class is correct at voxel x
is ``p*[argmax logits](x)``. It also returns ``ece_noise``, the scale of the label-sampling noise of a
label-based ECE, so tests can compare a measured ECE with the implied one within a stated tolerance.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

import numpy as np

IGNORE_INDEX = 255

# Independent random streams of one case (children of SeedSequence(seed), in this order).
_STREAMS = ("true_field", "labels", "boundary", "offset", "ignore", "layout")


@dataclass(frozen=True)
class Miscalibration:
    """How the model logits depart from the true class scores (see the module docstring)."""

    temperature: float = 0.55  # logits = z*/T: T < 1 is overconfident
    class_bias: Optional[tuple[float, ...]] = None  # added to the model logits; None = zeros
    boundary_noise: float = 1.5  # std of the extra score noise where the true top-2 margin is 0
    boundary_width: float = 1.0  # margin (logit units) over which that noise decays by 1/e
    boundary_length_scale: float = 2.0  # smoothness of the boundary noise (voxels)
    offset_mean: float = 0.0  # spatial mean of c(x)
    offset_std: float = 3.0  # spatial standard deviation of c(x) (population std over the case)
    offset_length_scale: float = 24.0  # smoothness of c(x) (voxels)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["class_bias"] = None if self.class_bias is None else [float(b) for b in self.class_bias]
        return d


@dataclass
class SyntheticCase:
    """One generated case. Arrays are classes first, spatial axes in C order."""

    logits: np.ndarray  # (C, *spatial) float32, the miscalibrated model logits
    labels: np.ndarray  # (*spatial) uint8 (int64 when C > 255), drawn from `posterior`; ignore_index where ignored
    posterior: np.ndarray  # (C, *spatial) float32, the true posterior p* = S(true_logits)
    true_logits: np.ndarray  # (C, *spatial) float32, z*
    offset: np.ndarray  # (*spatial) float32, c(x), already included in `logits`
    class_names: tuple[str, ...]
    ignore_index: int
    params: dict = field(default_factory=dict)  # everything needed to regenerate; JSON-serialisable

    @property
    def valid(self) -> np.ndarray:
        return self.labels != self.ignore_index

    @property
    def num_classes(self) -> int:
        return int(self.logits.shape[0])


# ----------------------------------------------------------------------------------------------------------
# Building blocks


def softmax(x: np.ndarray, axis: int = 0) -> np.ndarray:
    """Numerically stable softmax in the dtype of `x` (float32 stays float32)."""
    m = x.max(axis=axis, keepdims=True)
    e = np.exp(x - m)
    e /= e.sum(axis=axis, keepdims=True)
    return e


def _upsample_linear(a: np.ndarray, axis: int, factor: int, size: int) -> np.ndarray:
    """Linear interpolation of `a` along `axis` from a grid of step `factor` onto `size` points.

    Output point ``j·factor + r`` is ``a[j] + (r/factor)·(a[j+1] - a[j])``, written as a ``(coarse-1, factor)``
    view of the output, one pass per `r`. Needs ``(a.shape[axis] - 1)·factor >= size``.
    """
    head = (slice(None),) * axis
    lo = a[head + (slice(None, -1),)]
    step = a[head + (slice(1, None),)] - lo
    out = np.empty(lo.shape[:axis + 1] + (factor,) + lo.shape[axis + 1:], dtype=a.dtype)
    for r in range(factor):  # one pass per offset r: long inner loops whatever the axis
        dst = out[head + (slice(None), r)]
        np.multiply(step, a.dtype.type(r / factor), out=dst)
        dst += lo
    out = out.reshape(a.shape[:axis] + (-1,) + a.shape[axis + 1:])
    return out[head + (slice(0, size),)]


def smooth_fields(rng: np.random.Generator, count: int, spatial_shape: Sequence[int],
                  length_scale: float) -> np.ndarray:
    """`count` independent smooth random fields, shape (count, *spatial), float32, each with spatial mean 0
    and standard deviation 1.

    White noise is Gaussian-filtered (sigma = `length_scale` voxels) with an FFT on a grid coarser by
    ``factor = length_scale // 3`` (so sigma stays >= 3 coarse cells) padded by 3 sigma against wrap-around,
    then linearly upsampled. Cost is dominated by the upsampling, O(count * voxels): cheap enough for
    gigabytes of benchmark data.
    """
    spatial_shape = tuple(int(s) for s in spatial_shape)
    if length_scale <= 0:
        raise ValueError("length_scale must be positive")
    factor = max(1, int(length_scale // 3))
    sigma = length_scale / factor
    pad = int(math.ceil(3 * sigma))
    coarse = tuple((s - 1) // factor + 2 for s in spatial_shape)
    padded = tuple(c + 2 * pad for c in coarse)
    noise = rng.standard_normal((count,) + padded, dtype=np.float32)
    axes = tuple(range(1, noise.ndim))
    spectrum = np.fft.rfftn(noise, axes=axes)
    gain = np.ones(spectrum.shape[1:], dtype=np.float32)
    for k, n in enumerate(padded):
        f = np.fft.rfftfreq(n) if k == len(padded) - 1 else np.fft.fftfreq(n)
        g = np.exp(-0.5 * (2 * np.pi * f * sigma) ** 2)
        shape = [1] * len(padded)
        shape[k] = g.size
        gain = gain * g.astype(np.float32).reshape(shape)
    spectrum *= gain
    smooth = np.fft.irfftn(spectrum, s=padded, axes=axes)
    smooth = smooth[(slice(None),) + tuple(slice(pad, pad + c) for c in coarse)]
    out = smooth.astype(np.float32)
    if factor > 1:
        for k in reversed(range(len(spatial_shape))):  # last axis first: measured fastest
            out = _upsample_linear(out, k + 1, factor, spatial_shape[k])
        out = np.ascontiguousarray(out)
    else:
        out = np.ascontiguousarray(out[(slice(None),) + tuple(slice(0, s) for s in spatial_shape)])
    for field_ in out.reshape(count, -1):  # float32 pairwise sums: ~1e-6 relative error, and fast
        field_ -= field_.mean()
        field_ /= field_.std() or np.float32(1)
    return out


def sample_labels(rng: np.random.Generator, posterior: np.ndarray) -> np.ndarray:
    """One draw y ~ Categorical(posterior[:, x]) per voxel (inverse CDF), int64 (*spatial).

    y = number of classes k < C-1 whose cumulative probability is <= u·total, with u ~ U[0, 1) and total the
    float sum of the posterior (so rounding never makes the last class unreachable). Running sums over the
    class axis keep every pass contiguous.
    """
    u = rng.random(posterior.shape[1:], dtype=np.float64).astype(posterior.dtype)
    total = posterior.sum(axis=0)
    u *= total
    labels = np.zeros(posterior.shape[1:], np.int64)
    running = np.zeros(posterior.shape[1:], posterior.dtype)
    for k in range(posterior.shape[0] - 1):
        running += posterior[k]
        labels += running <= u
    return labels


def _top2_margin(z: np.ndarray) -> np.ndarray:
    """Largest minus second-largest entry along axis 0 (running max and runner-up, contiguous passes)."""
    if z.shape[0] < 2:
        return np.full(z.shape[1:], np.inf, dtype=z.dtype)
    first = np.maximum(z[0], z[1])
    second = np.minimum(z[0], z[1])
    for k in range(2, z.shape[0]):
        np.maximum(second, np.minimum(first, z[k]), out=second)
        np.maximum(first, z[k], out=first)
    return first - second


def _streams(seed: int) -> dict[str, np.random.Generator]:
    children = np.random.SeedSequence(int(seed)).spawn(len(_STREAMS))
    return {name: np.random.default_rng(child) for name, child in zip(_STREAMS, children)}


def _finish_case(true_logits: np.ndarray, streams: dict, mis: Miscalibration, ignore: Optional[np.ndarray],
                 class_names: Sequence[str], params: dict) -> SyntheticCase:
    """From z* and the miscalibration: posterior, labels, model logits."""
    num_classes = true_logits.shape[0]
    spatial = true_logits.shape[1:]
    posterior = softmax(true_logits, axis=0)
    labels = sample_labels(streams["labels"], posterior)
    label_dtype = np.uint8 if num_classes <= 255 else np.int64
    labels = labels.astype(label_dtype)
    if ignore is not None:
        labels[ignore] = IGNORE_INDEX

    # Boundary errors: smooth noise, weighted by how close the true top-2 scores are.
    noise = smooth_fields(streams["boundary"], num_classes, spatial, mis.boundary_length_scale)
    weight = np.exp(-_top2_margin(true_logits) / np.float32(mis.boundary_width))
    noise *= np.float32(mis.boundary_noise) * weight[None]
    logits = true_logits + noise
    logits *= np.float32(1.0 / mis.temperature)
    if mis.class_bias is not None:
        bias = np.asarray(mis.class_bias, dtype=np.float32)
        if bias.shape != (num_classes,):
            raise ValueError(f"class_bias has {bias.shape} entries, expected ({num_classes},)")
        logits += bias.reshape((num_classes,) + (1,) * len(spatial))

    # The per-voxel offset c(x)·1: exact spatial mean and standard deviation.
    offset = smooth_fields(streams["offset"], 1, spatial, mis.offset_length_scale)[0]
    offset *= np.float32(mis.offset_std)
    offset += np.float32(mis.offset_mean)
    logits += offset[None]

    params = dict(params)
    params["miscalibration"] = mis.as_dict()
    params["ignore_index"] = IGNORE_INDEX
    params["class_names"] = list(class_names)
    return SyntheticCase(logits=logits.astype(np.float32, copy=False), labels=labels,
                         posterior=posterior.astype(np.float32, copy=False),
                         true_logits=true_logits.astype(np.float32, copy=False), offset=offset,
                         class_names=tuple(class_names), ignore_index=IGNORE_INDEX, params=params)


# ----------------------------------------------------------------------------------------------------------
# Generic case


def make_case(spatial_shape: Sequence[int], num_classes: int, seed: int, *,
              class_prior: Optional[Sequence[float]] = None, amplitude: float = 4.0,
              length_scale: float = 8.0, miscalibration: Miscalibration = Miscalibration(),
              ignore_fraction: float = 0.0, class_names: Optional[Sequence[str]] = None) -> SyntheticCase:
    """A generic case: ``z*_k = class_prior_k + amplitude · f_k(x)`` with smooth unit fields `f_k`.

    `ignore_fraction` > 0 marks that share of voxels (in random square patches) with `IGNORE_INDEX`.
    """
    spatial_shape = tuple(int(s) for s in spatial_shape)
    if num_classes < 1:
        raise ValueError("num_classes must be >= 1")
    streams = _streams(seed)
    prior = np.zeros(num_classes, np.float32) if class_prior is None else np.asarray(class_prior, np.float32)
    if prior.shape != (num_classes,):
        raise ValueError(f"class_prior has {prior.shape} entries, expected ({num_classes},)")
    z = smooth_fields(streams["true_field"], num_classes, spatial_shape, length_scale)
    z *= np.float32(amplitude)
    z += prior.reshape((num_classes,) + (1,) * len(spatial_shape))
    ignore = _random_patches(streams["ignore"], spatial_shape, ignore_fraction) if ignore_fraction > 0 else None
    names = tuple(class_names) if class_names is not None else tuple(f"class_{k}" for k in range(num_classes))
    params = {"kind": "generic", "seed": int(seed), "spatial_shape": list(spatial_shape),
              "num_classes": int(num_classes), "class_prior": [float(p) for p in prior],
              "amplitude": float(amplitude), "length_scale": float(length_scale),
              "ignore_fraction": float(ignore_fraction)}
    return _finish_case(z, streams, miscalibration, ignore, names, params)


def _random_patches(rng: np.random.Generator, shape: tuple[int, ...], fraction: float,
                    size: Optional[int] = None) -> np.ndarray:
    """Boolean mask of random axis-aligned square patches covering about `fraction` of the voxels."""
    mask = np.zeros(shape, dtype=bool)
    total = mask.size
    side = size or max(2, int(round(min(shape) / 8)))
    target = int(round(fraction * total))
    for _ in range(10_000):
        if int(mask.sum()) >= target:
            break
        corner = [int(rng.integers(0, max(1, s - side + 1))) for s in shape]
        mask[tuple(slice(c, c + side) for c in corner)] = True
    return mask


# ----------------------------------------------------------------------------------------------------------
# Presets used by sample_data/ (parameters documented in sample_data/README.md)

STREET_CLASSES = ("road", "building", "vegetation", "sky", "sidewalk", "car", "person", "pole")
# Per-class prior score, and its change from the top row to the bottom row of the image (sky high,
# road low): together they give a dominant road class and rare person/pole classes.
STREET_PRIOR = (3.0, 0.8, 0.0, -0.4, -1.2, -1.6, -4.5, -5.0)
STREET_ROW_SLOPE = (10.0, -3.0, 0.0, -12.0, 4.0, 1.0, 0.0, 0.0)
STREET_LENGTH_SCALES = (12.0, 12.0, 9.0, 12.0, 9.0, 6.0, 4.0, 3.0)
STREET_AMPLITUDE = 5.0
STREET_MISCALIBRATION = Miscalibration(
    temperature=0.55,
    class_bias=(0.4, 0.1, 0.0, 0.0, -0.1, -0.2, -0.5, -0.6),
    boundary_noise=1.5, boundary_width=1.0, boundary_length_scale=2.0,
    offset_mean=2.0, offset_std=2.5, offset_length_scale=24.0,
)
STREET_IGNORE_BOTTOM_ROWS = 8  # an "ego vehicle" band at the bottom of every image
STREET_IGNORE_FRACTION = 0.02  # plus random square patches


def make_street_case(seed: int, shape: Sequence[int] = (96, 128),
                     miscalibration: Miscalibration = STREET_MISCALIBRATION) -> SyntheticCase:
    """A 2D street-scene-like image: 8 classes, strong imbalance, ignore-labelled bottom band and patches."""
    height, width = (int(s) for s in shape)
    streams = _streams(seed)
    num_classes = len(STREET_CLASSES)
    z = np.empty((num_classes, height, width), np.float32)
    for scale in sorted(set(STREET_LENGTH_SCALES)):
        idx = [k for k, s in enumerate(STREET_LENGTH_SCALES) if s == scale]
        z[idx] = smooth_fields(streams["true_field"], len(idx), (height, width), scale)
    z *= np.float32(STREET_AMPLITUDE)
    row = (np.arange(height, dtype=np.float32) / max(1, height - 1) - np.float32(0.5))[:, None]
    for k in range(num_classes):
        z[k] += np.float32(STREET_PRIOR[k]) + np.float32(STREET_ROW_SLOPE[k]) * row
    ignore = _random_patches(streams["ignore"], (height, width), STREET_IGNORE_FRACTION, size=8)
    ignore[height - STREET_IGNORE_BOTTOM_ROWS:] = True
    params = {"kind": "street", "seed": int(seed), "spatial_shape": [height, width],
              "num_classes": num_classes, "class_prior": list(STREET_PRIOR),
              "row_slope": list(STREET_ROW_SLOPE), "length_scales": list(STREET_LENGTH_SCALES),
              "amplitude": STREET_AMPLITUDE, "ignore_bottom_rows": STREET_IGNORE_BOTTOM_ROWS,
              "ignore_patch_fraction": STREET_IGNORE_FRACTION}
    return _finish_case(z, streams, miscalibration, ignore, STREET_CLASSES, params)


BRAIN_CLASSES = ("background", "edema", "enhancing", "necrotic_core")
# Class k is favoured where the normalised tumour radius rho is near BRAIN_SHELL_CENTRES[k]:
# z*_k = -BRAIN_SHARPNESS (rho - centre_k)^2, so the argmax regions are nested shells (core inside
# enhancing inside edema inside background), with boundaries at rho = 0.475, 0.8, 1.275.
BRAIN_SHELL_CENTRES = (1.6, 0.95, 0.65, 0.3)
BRAIN_SHARPNESS = 12.0
BRAIN_RHO_CLIP = 2.0  # beyond this radius scores stop growing (keeps float16 logits small)
BRAIN_RADIUS_FRACTION = 0.22  # tumour length unit R as a fraction of the smallest side
BRAIN_SHAPE_NOISE = 0.25  # smooth perturbation of rho (irregular tumour outline)
BRAIN_TEXTURE = 0.7  # per-class smooth score noise (logit units)
BRAIN_MISCALIBRATION = Miscalibration(
    temperature=0.6,
    class_bias=(0.3, 0.0, -0.2, -0.3),
    boundary_noise=2.0, boundary_width=1.0, boundary_length_scale=2.0,
    offset_mean=-3.0, offset_std=4.0, offset_length_scale=16.0,
)


def make_brain_case(seed: int, shape: Sequence[int] = (40, 44, 48),
                    miscalibration: Miscalibration = BRAIN_MISCALIBRATION) -> SyntheticCase:
    """A 3D brain-MRI-like volume (D, H, W): background and three nested tumour-like regions."""
    shape = tuple(int(s) for s in shape)
    streams = _streams(seed)
    layout = streams["layout"]
    num_classes = len(BRAIN_CLASSES)
    radius = BRAIN_RADIUS_FRACTION * min(shape)
    centre = [s / 2 + layout.uniform(-0.12, 0.12) * s for s in shape]
    stretch = layout.uniform(0.8, 1.25, size=len(shape))
    grids = np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij")
    rho2 = np.zeros(shape, np.float32)
    for g, c, a in zip(grids, centre, stretch):
        rho2 += ((g - np.float32(c)) / np.float32(radius * a)) ** 2
    rho = np.sqrt(rho2)
    fields = smooth_fields(streams["true_field"], num_classes + 1, shape, 6.0)
    rho += np.float32(BRAIN_SHAPE_NOISE) * fields[num_classes]
    np.minimum(rho, np.float32(BRAIN_RHO_CLIP), out=rho)
    z = fields[:num_classes]
    z *= np.float32(BRAIN_TEXTURE)
    for k in range(num_classes):
        z[k] -= np.float32(BRAIN_SHARPNESS) * (rho - np.float32(BRAIN_SHELL_CENTRES[k])) ** 2
    params = {"kind": "brain", "seed": int(seed), "spatial_shape": list(shape), "num_classes": num_classes,
              "shell_centres": list(BRAIN_SHELL_CENTRES), "sharpness": BRAIN_SHARPNESS,
              "rho_clip": BRAIN_RHO_CLIP, "radius_fraction": BRAIN_RADIUS_FRACTION,
              "shape_noise": BRAIN_SHAPE_NOISE, "texture": BRAIN_TEXTURE,
              "tumour_centre": [float(c) for c in centre], "tumour_stretch": [float(a) for a in stretch]}
    return _finish_case(np.ascontiguousarray(z), streams, miscalibration, None, BRAIN_CLASSES, params)


# ----------------------------------------------------------------------------------------------------------
# What the generator implies for given logits


def bin_edges(bins: int) -> np.ndarray:
    """The equal-width edges segcal and fiducio use: float32 linspace, compared in float64."""
    return np.linspace(0.0, 1.0, bins + 1, dtype=np.float32).astype(np.float64)


def implied_metrics(logits: np.ndarray, posterior: np.ndarray, valid: Optional[np.ndarray] = None,
                    bins: int = 15, block_voxels: int = 1 << 20) -> dict:
    """Population metrics of `logits` under the true posterior, with no label-sampling noise.

    `logits` and `posterior` are (C, *spatial) (or (C, n)); `valid` (*spatial) bool selects voxels. Per voxel,
    with ``p = S(logits)`` (float64), ``conf = max p``, ``pred = argmax p`` and ``a = p*[pred]`` (the true
    probability that the prediction is correct):

    * ``ece / mce / ace``: right-closed equal-width binning of `conf` (theory.md §6; bin 0 also holds 0),
      bin accuracy = mean ``a`` over the bin;
    * ``accuracy`` = mean ``a``; ``confidence`` = mean ``conf``;
    * ``nll`` = mean ``-Σ_k p*_k log p_k`` and ``brier`` = mean ``Σ_k p_k² - 2 p_k p*_k + p*_k`` (the expectations
      of the label-based NLL and Brier score);
    * ``ece_noise`` = ``Σ_b sqrt(Σ_{i∈b} a_i(1-a_i)) / N``: the standard-deviation scale of the label-sampling
      error of a label-based ECE (labels are independent given p*): ``|ECE_labels - ece| <= ece_noise``
      typically, and well inside ``4·ece_noise`` in practice;
    * ``reliability``: per bin ``lo, hi, count, confidence, accuracy``.
    """
    logits = np.asarray(logits)  # numpy arrays, or CPU torch tensors
    posterior = np.asarray(posterior)
    C = logits.shape[0]
    if posterior.shape != logits.shape:
        raise ValueError(f"posterior shape {posterior.shape} != logits shape {logits.shape}")
    lg = logits.reshape(C, -1)
    ps = posterior.reshape(C, -1)
    sel = None if valid is None else np.asarray(valid, bool).reshape(-1)
    edges = bin_edges(bins)
    count = np.zeros(bins, np.int64)
    sum_conf = np.zeros(bins)
    sum_acc = np.zeros(bins)
    sum_var = np.zeros(bins)
    sum_nll = 0.0
    sum_brier = 0.0
    n_total = lg.shape[1]
    for start in range(0, n_total, block_voxels):
        stop = min(n_total, start + block_voxels)
        z = lg[:, start:stop].astype(np.float64)
        q = ps[:, start:stop].astype(np.float64)
        if sel is not None:
            keep = sel[start:stop]
            z = z[:, keep]
            q = q[:, keep]
        if z.shape[1] == 0:
            continue
        m = z.max(axis=0)
        lse = m + np.log(np.exp(z - m).sum(axis=0))
        logp = z - lse
        p = np.exp(logp)
        pred = z.argmax(axis=0)
        conf = p[pred, np.arange(p.shape[1])]
        acc = q[pred, np.arange(q.shape[1])]
        idx = np.searchsorted(edges[1:-1], conf, side="left")  # right-closed bins: (lo, hi]
        count += np.bincount(idx, minlength=bins)
        sum_conf += np.bincount(idx, weights=conf, minlength=bins)
        sum_acc += np.bincount(idx, weights=acc, minlength=bins)
        sum_var += np.bincount(idx, weights=acc * (1 - acc), minlength=bins)
        sum_nll += float(-(q * logp).sum())
        sum_brier += float((p * p - 2 * p * q + q).sum())
    n = int(count.sum())
    if n == 0:
        raise ValueError("no valid voxels")
    nonempty = count > 0
    safe = np.maximum(count, 1)
    bin_conf = sum_conf / safe
    bin_acc = sum_acc / safe
    gap = np.abs(bin_acc - bin_conf)
    reliability = [{"lo": float(edges[b]), "hi": float(edges[b + 1]), "count": int(count[b]),
                    "confidence": float(bin_conf[b]) if nonempty[b] else None,
                    "accuracy": float(bin_acc[b]) if nonempty[b] else None} for b in range(bins)]
    return {
        "voxels": n,
        "bins": bins,
        "ece": float((count * gap).sum() / n),
        "mce": float(gap[nonempty].max()),
        "ace": float(gap[nonempty].mean()),
        "accuracy": float(sum_acc.sum() / n),
        "confidence": float(sum_conf.sum() / n),
        "nll": sum_nll / n,
        "brier": sum_brier / n,
        "ece_noise": float(np.sqrt(sum_var).sum() / n),
        "reliability": reliability,
    }
