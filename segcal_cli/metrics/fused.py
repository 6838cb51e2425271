"""The per-voxel work of `evaluate` and its histograms as one numba kernel (CPU, float32).

For a block of logits (C, n) float32, labels (n,) int64 and a validity mask, `accumulate` computes per voxel,
in float32: the top logit and the prediction (lowest class on ties, as voxels.predictions), S = sum_k
exp(z_k - top) added in class order 0..C-1, conf = 1/S, nll = log S + top - z_y, brier = (sum_k e_k^2 conf -
2 e_y) conf + 1, the reliability bin of conf exactly as binning.Binner.index (same float32 edge table, same
guess-and-correct rule, all three rules) and the adaptive-ECE bucket (adaptive.fine_bucket); and it adds, for
valid voxels only, everything MetricState.add would: the voxel count, float64 NLL / Brier sums, the
interleaved (bin, correct) counts, float64 confidence sums per bin, the confusion matrix and the adaptive
buckets (count, confidence sum, min, max), in place into the state's tensors. Classwise ECE and BA-ECE are
not computed here (MetricState.add_extras adds them from eager statistics). Every per-voxel value is a pure
function of that voxel's logits and label, so results do not depend on where blocks are cut (float sums up to
float64 addition order).

Design (2-core AMD EPYC, AVX2, 512 KB L2, ~7 GB/s memory):
* Voxels are processed in tiles of TILE voxels x all classes (78 KB: stays in L2), so the logits are read from
  memory once. Inside a tile the class loop is outside and the voxel loop inside (contiguous, vectorised 8
  wide by LLVM): one pass for top/prediction, one for the exponentials, then per-voxel passes (labels, bins,
  NLL, Brier), then the histogram scatter. Classes go 4 at a time so the per-voxel running values are loaded
  and stored once per 4 classes (and a one-class in-place max would be vectorised with masked stores, which
  are slow on this CPU).
* exp and log are polynomials written here (LLVM has no vector libm: math.exp stays scalar). exp(x), x <= 0:
  x = n ln2 + r, a degree-6 polynomial in r (fitted for relative error), 2^n added to the exponent bits;
  within 0.9 ulp of float64 exp over [-87, 0] (measured on 8 M points), exp(0) = 1 exactly (so the top class
  contributes exactly 1, and a voxel whose other classes underflow gets conf exactly 1.0, like the eager path);
  below -87 it returns exp(-87) = 1.6e-38 (never a denormal). log (Cephes logf): within 0.8 ulp.
* The bin is floor(c B) unless c B lies within B * 1e-6 of an integer (c near an edge, or c = 0): those few
  voxels are binned against the edge table in scalar code, so the bins equal Binner.index's for the same conf.
* Histograms: COPIES interleaved copies (voxel j into copy j % COPIES) so consecutive voxels in the same bin do
  not wait on each other's stores; invalid voxels go to a discard slot, so the scatter loop has no branch.
* fastmath is only `contract` (FMA): no reassociation, so sums keep their class order. No numba threads
  (parallel=False); nogil=True, so the reader / converter thread runs while the kernel works.
* Compiled on first use (importing this module does not import numba) with numba's on-disk cache: ~8 s the
  very first time, then ~0.45 s to load plus ~0.3 s to import numba per process. That start-up is why
  `evaluate` uses the kernel by default only from kernel_choice.MIN_VALUES voxel-classes on.

Measured (1 thread, the benchmark file bench_data/bench.h5: 52 M voxels x 19 classes, --metrics
ece,nll,brier,dice; `python /tmp/exp/prof_fused.py 1`-style harness: Evaluation.add_block on 256x1024 units,
extrapolated to the file): eager 5.8 s, fused 1.0 s (5.6x); with adaptive_ece 6.3 s vs 1.3 s. Where the
fused time goes (perf): exponentials ~40%, top/prediction ~10%, labels ~10%, bins and keys ~10%, NLL + Brier
~10%, scatter ~10%. The exp alone runs at ~0.33 ns per value (in cache). `segcal evaluate` on that file: the
read-and-score loop took 1.5-1.7 s instead of 6.8 s (two threads: reader/converter and this kernel).

Switches: SEGCAL_FUSED=0 (false/no/off) forces the eager path, SEGCAL_FUSED=1 forces the kernel whatever the
data size; --compile / SEGCAL_COMPILE=1 select the torch.compile kernel instead. Without numba, or when the
kernel fails to compile, the eager path is used (Evaluation.fused_unavailable says why).
"""

from __future__ import annotations

import warnings
from typing import Optional

import numpy as np
import torch

from segcal_cli.metrics import adaptive

ENV_VAR = "SEGCAL_FUSED"

# Voxels per tile: the tile's (C, TILE) float32 logits (78 KB for 19 classes) and its per-voxel scratch stay in
# L2 between the two class loops, so the logits are read from memory once (256 / 512 / 2048 measured 10% / 5% /
# 1% slower).
TILE = 1024
COPIES = 4  # interleaved copies of the small histograms (a power of 2)

_f32 = np.float32
_i32 = np.int32
_u64 = np.uint64  # unsigned indices: numba adds no negative-index wraparound

# exp(x), x <= 0, is fastmath.exp_nonpositive (a degree-6 polynomial fitted for relative error, 2^n added to the
# exponent bits; at most 0.9 ulp from float64 exp over [-87, 0], tests/test_metrics_fused.py asserts <= 2), and
# log(x) fastmath.log_positive: one copy of each for every kernel.
_ONE = _f32(1.0)
_ZERO = _f32(0.0)
_HALF = _f32(0.5)
_TWO = _f32(2.0)

# adaptive.fine_bucket's constants
_FINE_SHIFT = _i32(adaptive.SHIFT)
_FINE_BASE = _i32(adaptive.BASE)
_FINE_LAST = _i32(adaptive.NUM_BUCKETS - 1)
_FINE_FLOOR = _f32(adaptive.FLOOR)

RULE_CODES = {"right": 0, "left": 1, "torchmetrics": 2}


def near_tolerance(bins: int) -> np.float32:
    """How close (in units of c B) to an integer c B must be for a voxel to be binned exactly against the edge
    table. float32 c B is within 6e-8 B of the real product and torch's float32 edges lie within ~2e-7 of
    i / B, so B * 1e-6 leaves a 3x margin; for B so large that this is not small, every voxel is binned exactly."""
    tol = bins * 1e-6
    return np.float32(tol if tol < 0.25 else 2.0)

# fastmath: only contraction into FMAs (the polynomials gain accuracy and speed). No reassociation: sums over
# classes keep their order 0..C-1 and need no vector reduction (the class loop is outside the voxel loop).
_FASTMATH = {"contract"}


_exp_nonpositive = None  # fastmath.exp_nonpositive, bound by _load_numba (the kernels resolve it by name)
_log_positive = None  # fastmath.log_positive (Cephes logf), bound the same way


def _bin_exact(c, table, B, rule):
    """binning.Binner.index of one float32 confidence, from the float32 edge table."""
    guess = min(max(_i32(c * _f32(B)), _i32(0)), _i32(B - 1))
    lower = table[_u64(guess)]
    upper = table[_u64(guess + 1)]
    if rule == 0:  # (e_i, e_(i+1)]
        idx = guess - _i32((c <= lower) & (guess > 0)) + _i32(c > upper)
    else:  # [e_i, e_(i+1))
        idx = guess - _i32(c < lower) + _i32((c >= upper) & (guess < B - 1))
    idx = min(max(idx, _i32(0)), _i32(B - 1))
    if rule == 2 and c >= _ONE:  # torchmetrics: 1.0 in a bin of its own
        idx = _i32(B)
    return idx


def _accumulate(stored, labels, valid, use_valid, start, stop, table, bins, rule, near_tol, want_nll, want_brier,
                want_fine, want_pred, pred_out, bin_count, bin_conf, confusion, fine_count, fine_conf, fine_min,
                fine_max):
    """Voxels [start, stop) of `stored` (C, N) float32, or the uint16 bits of float16 logits: accumulate into
    the histograms (in place) and return (valid voxels, nll sum, brier sum, first voxel whose label is outside
    [0, C) or -1)."""
    C = stored.shape[0]
    scratch = np.empty((C, TILE), np.float32)  # a float16 tile, converted (see _tile_source)
    B = bins
    nb = bin_conf.shape[0]
    Bf = _f32(bins)
    one_bin = _bin_exact(_ONE, table, B, rule)
    # per-tile scratch
    top = np.empty(TILE, np.float32)
    arg = np.empty(TILE, np.int32)
    total = np.empty(TILE, np.float32)
    square = np.empty(TILE, np.float32)
    label = np.empty(TILE, np.int32)
    z_label = np.empty(TILE, np.float32)
    weight = np.empty(TILE, np.float32)  # 1 for a valid voxel, else 0
    conf = np.empty(TILE, np.float32)
    near = np.empty(TILE, np.bool_)
    count_key = np.empty(TILE, np.int32)
    conf_key = np.empty(TILE, np.int32)
    pair_key = np.empty(TILE, np.int32)
    nll = np.empty(TILE, np.float32)
    brier = np.empty(TILE, np.float32)
    nll_lanes = np.zeros(TILE, np.float64)
    brier_lanes = np.zeros(TILE, np.float64)
    # COPIES interleaved copies of the small histograms (voxel j goes to copy j % COPIES): consecutive voxels
    # mostly fall in the same bin, and with one copy each increment would wait for the previous one's store.
    # The last entry of each is a bin for invalid voxels, so the scatter loop needs no branch.
    nb32 = _i32(nb)
    C32 = _i32(C)
    count_stride = _i32(2 * nb)
    pair_stride = _i32(C * C)
    pair_copies = COPIES if C <= 64 else 1  # the confusion matrix of many classes: one copy (memory)
    pair_mask = _i32(pair_copies - 1)
    counts = np.zeros(COPIES * count_stride + 1, np.int64)
    conf_sums = np.zeros(COPIES * nb + 1, np.float64)
    pairs = np.zeros(pair_copies * pair_stride + 1, np.int64)
    count_trash = _i32(COPIES * count_stride)
    conf_trash = _i32(COPIES * nb)
    pair_trash = _i32(pair_copies * pair_stride)
    voxels = 0
    bad_label = -1
    for t0 in range(start, stop, TILE):
        w = min(TILE, stop - t0)
        z, o = _tile_source(stored, t0, w, scratch)  # float32 logits of the tile: z[:, o:o + w]
        # Top logit and prediction (strict >: the lowest class wins ties). Classes go 4 at a time (and a pair
        # first or last): top and arg are loaded and stored once per group, and a one-class update in place
        # would be vectorized with masked stores (slow on this CPU).
        z0 = z[0, o:o + w]
        if (C - 1) % 2 == 1:
            z1 = z[1, o:o + w]
            for j in range(w):
                t = z0[j]
                v = z1[j]
                g = v > t
                top[j] = v if g else t
                arg[j] = _i32(1) if g else _i32(0)
            k = 2
        else:
            for j in range(w):
                top[j] = z0[j]
                arg[j] = _i32(0)
            k = 1
        while k + 4 <= C:
            r0 = z[k, o:o + w]
            r1 = z[k + 1, o:o + w]
            r2 = z[k + 2, o:o + w]
            r3 = z[k + 3, o:o + w]
            k0 = _i32(k)
            for j in range(w):
                t = top[j]
                a = arg[j]
                v = r0[j]
                g = v > t
                t = v if g else t
                a = k0 if g else a
                v = r1[j]
                g = v > t
                t = v if g else t
                a = k0 + _i32(1) if g else a
                v = r2[j]
                g = v > t
                t = v if g else t
                a = k0 + _i32(2) if g else a
                v = r3[j]
                g = v > t
                t = v if g else t
                a = k0 + _i32(3) if g else a
                top[j] = t
                arg[j] = a
            k += 4
        if k < C:  # the last two classes
            r0 = z[k, o:o + w]
            r1 = z[k + 1, o:o + w]
            k0 = _i32(k)
            for j in range(w):
                t = top[j]
                a = arg[j]
                v = r0[j]
                g = v > t
                t = v if g else t
                a = k0 if g else a
                v = r1[j]
                g = v > t
                t = v if g else t
                a = k0 + _i32(1) if g else a
                top[j] = t
                arg[j] = a
        # S = sum_k exp(z_k - top) and sum_k exp(z_k - top)^2, added in class order 0..C-1, 4, 2, 1 classes
        # per pass over the tile
        for j in range(w):
            total[j] = _ZERO
            square[j] = _ZERO
        k = 0
        while k + 4 <= C:
            r0 = z[k, o:o + w]
            r1 = z[k + 1, o:o + w]
            r2 = z[k + 2, o:o + w]
            r3 = z[k + 3, o:o + w]
            for j in range(w):
                t = top[j]
                s = total[j]
                q = square[j]
                e = _exp_nonpositive(r0[j] - t)
                s += e
                q += e * e
                e = _exp_nonpositive(r1[j] - t)
                s += e
                q += e * e
                e = _exp_nonpositive(r2[j] - t)
                s += e
                q += e * e
                e = _exp_nonpositive(r3[j] - t)
                s += e
                q += e * e
                total[j] = s
                square[j] = q
            k += 4
        if k + 2 <= C:
            r0 = z[k, o:o + w]
            r1 = z[k + 1, o:o + w]
            for j in range(w):
                t = top[j]
                s = total[j]
                q = square[j]
                e = _exp_nonpositive(r0[j] - t)
                s += e
                q += e * e
                e = _exp_nonpositive(r1[j] - t)
                s += e
                q += e * e
                total[j] = s
                square[j] = q
            k += 2
        if k < C:
            r0 = z[k, o:o + w]
            for j in range(w):
                e = _exp_nonpositive(r0[j] - top[j])
                total[j] += e
                square[j] += e * e
        # labels (0 for invalid voxels) and the label's logit
        out_of_range = False
        if use_valid:
            for j in range(w):
                kept = valid[t0 + j]
                y = labels[t0 + j] if kept else 0
                out_of_range |= _u64(y) >= _u64(C)
                weight[j] = _ONE if kept else _ZERO
                label[j] = _i32(y)
        else:
            for j in range(w):
                y = labels[t0 + j]
                out_of_range |= _u64(y) >= _u64(C)
                weight[j] = _ONE
                label[j] = _i32(y)
        if out_of_range:  # reported by the caller; binned as class 0 meanwhile (no out-of-bounds access)
            for j in range(w):
                if weight[j] != _ZERO and _u64(labels[t0 + j]) >= _u64(C):
                    if bad_label < 0:
                        bad_label = t0 + j
                    label[j] = _i32(0)
        for j in range(w):
            z_label[j] = z[_u64(label[j]), _u64(o + j)]
        # confidence, reliability bin and histogram keys. floor(c B) is the bin unless c B lies within near_tol
        # of an integer (c near an edge, or c = 0): those voxels are binned exactly below.
        any_near = False
        for j in range(w):
            c = _ONE / total[j]
            conf[j] = c
            x = c * Bf
            g = _i32(x)
            frac = x - _f32(g)
            close = ((frac < near_tol) | (frac > _ONE - near_tol)) & (c < _ONE)
            near[j] = close
            any_near |= close
            g = min(g, _i32(B - 1))
            b = one_bin if c >= _ONE else g
            kept = weight[j] != _ZERO
            copy = _i32(j) & _i32(COPIES - 1)
            p = arg[j]
            y = label[j]
            ck = _i32(_i32(copy * count_stride) + _i32(b + b) + _i32(p == y))
            bk = _i32(_i32(copy * nb32) + b)
            pk = _i32(_i32((copy & pair_mask) * pair_stride) + _i32(y * C32) + p)
            count_key[j] = ck if kept else count_trash
            conf_key[j] = bk if kept else conf_trash
            pair_key[j] = pk if kept else pair_trash
        if any_near:
            for j in range(w):
                if near[j] and weight[j] != _ZERO:
                    b = _bin_exact(conf[j], table, B, rule)
                    copy = _i32(j) & _i32(COPIES - 1)
                    count_key[j] = copy * count_stride + 2 * b + _i32(arg[j] == label[j])
                    conf_key[j] = copy * nb + b
        # NLL and Brier in float32 (8 voxels per instruction), then summed per lane in float64
        if want_nll:  # log S + top - z_y
            for j in range(w):
                nll[j] = ((_log_positive(total[j]) + top[j]) - z_label[j]) * weight[j]
            for j in range(w):
                nll_lanes[j] += np.float64(nll[j])
        if want_brier:  # sum_k p_k^2 - 2 p_y + 1 = (sum_k e_k^2 / S - 2 e_y) / S + 1
            for j in range(w):
                c = conf[j]
                e_label = _exp_nonpositive(z_label[j] - top[j])
                brier[j] = ((square[j] * c - _TWO * e_label) * c + _ONE) * weight[j]
            for j in range(w):
                brier_lanes[j] += np.float64(brier[j])
        if want_pred:
            for j in range(w):
                pred_out[t0 - start + j] = arg[j]
        # histograms: a branch-free scalar scatter
        for j in range(w):
            counts[_u64(count_key[j])] += 1
            conf_sums[_u64(conf_key[j])] += np.float64(conf[j])
            pairs[_u64(pair_key[j])] += 1
        if want_fine:  # adaptive.fine_bucket, valid voxels only
            for j in range(w):
                if weight[j] == _ZERO:
                    continue
                c = conf[j]
                high = c >= _HALF
                u = (_ONE - c) if high else c
                u = u if u > _FINE_FLOOR else _FINE_FLOOR
                mag = _i32((np.float32(u).view(np.int32) >> _FINE_SHIFT) - _FINE_BASE)
                f = _u64((_FINE_LAST - mag) if high else mag)
                c64 = np.float64(c)
                fine_count[_u64(2) * f + _u64(arg[j] == label[j])] += 1
                fine_conf[f] += c64
                if c64 < fine_min[f]:
                    fine_min[f] = c64
                if c64 > fine_max[f]:
                    fine_max[f] = c64
    for copy in range(COPIES):
        for b in range(count_stride):
            bin_count[b] += counts[copy * count_stride + b]
        for b in range(nb):
            bin_conf[b] += conf_sums[copy * nb + b]
    for copy in range(pair_copies):
        for b in range(pair_stride):
            confusion[b] += pairs[copy * pair_stride + b]
    for b in range(COPIES * count_stride):
        voxels += counts[b]
    return voxels, nll_lanes.sum(), brier_lanes.sum(), bad_label


def _tile_source(stored, t0, w, scratch):
    """(array, offset) holding the float32 logits of voxels t0 .. t0 + w of `stored` in columns offset ..
    offset + w: float32 logits themselves, or float16 bits converted into `scratch` once per tile (so the
    class loops below read float32 either way). Implemented per dtype in _load_numba (numba overload)."""
    raise NotImplementedError


def _exp_array(x, out):
    """exp of every element (tests and the benchmark of the exp alone)."""
    for i in range(x.shape[0]):
        out[i] = _exp_nonpositive(x[i])


def _log_array(x, out):
    for i in range(x.shape[0]):
        out[i] = _log_positive(x[i])


# The kernels are compiled on first use: importing this module does not import numba.
accumulate = exp_array = log_array = None
_numba_error: Optional[str] = None
_loaded = False


def _load_numba() -> Optional[str]:
    """Import numba and wrap the kernels (once per process); the error text when numba is not importable."""
    global accumulate, exp_array, log_array, _numba_error, _loaded
    global _exp_nonpositive, _log_positive, _bin_exact
    if _loaded:
        return _numba_error
    _loaded = True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from numba import njit

            from numba.core import types
            from numba.extending import overload

            from segcal_cli.fastmath import finite_half_bits_to_float

            @overload(_tile_source, inline="always")
            def _tile_source_overload(stored, t0, w, scratch):
                if isinstance(stored.dtype, types.Float):
                    def float32_tile(stored, t0, w, scratch):
                        return stored, t0

                    return float32_tile

                def float16_tile(stored, t0, w, scratch):
                    for k in range(stored.shape[0]):
                        for j in range(_u64(w)):
                            scratch[k, j] = finite_half_bits_to_float(stored[k, _u64(t0) + j])
                    return scratch, 0

                return float16_tile

            # the helpers are module globals that the kernels' compilation resolves by name
            from segcal_cli import fastmath
            from segcal_cli.fastmath import exp_nonpositive as _shared_exp

            _exp_nonpositive = _shared_exp  # one exp and one log for every kernel (compiled inline="always")
            _log_positive = fastmath.log_positive
            _bin_exact = njit(fastmath=_FASTMATH, error_model="numpy", boundscheck=False)(_bin_exact)
            accumulate = fastmath.jit(nogil=True)(_accumulate)
            exp_array = fastmath.jit(nogil=True)(_exp_array)
            log_array = fastmath.jit(nogil=True)(_log_array)
    except Exception as err:  # not installed, or a broken install: the eager path is used
        _numba_error = f"{type(err).__name__}: {err}"
    return _numba_error


# -- the Python side -----------------------------------------------------------------------------------------


def disabled_by_env() -> bool:
    """SEGCAL_FUSED=0 (or false/no/off) forces the eager path."""
    from segcal_cli import kernel_choice

    return kernel_choice.setting(ENV_VAR) is False


def wanted(voxel_classes: int) -> bool:
    """SEGCAL_FUSED=0/1 if set, else whether the data is large enough to repay numba's start-up (~0.75 s per
    process, ~8 s to compile the very first time: the same threshold as every numba kernel, kernel_choice)."""
    from segcal_cli import kernel_choice

    return kernel_choice.wanted(voxel_classes, ENV_VAR)


def unavailable_reason() -> Optional[str]:
    """Why the kernel cannot be used in this process (None: it can). Imports numba and compiles the kernel
    (or loads it from numba's cache) the first time."""
    if disabled_by_env():
        return f"{ENV_VAR}=0"
    if _load_numba() is not None:
        return f"numba is not importable ({_numba_error})"
    if _warm_up() is not None:
        return f"the numba kernel failed to compile ({_compile_error})"
    return None


_compile_error: Optional[str] = None
_warmed_up = False


def _warm_up() -> Optional[str]:
    """Compile the kernel (or load it from numba's on-disk cache) for the argument types every later call has,
    once per process, with numba's warnings silenced; returns the error text if compiling failed."""
    global _warmed_up, _compile_error
    if _warmed_up:
        return _compile_error
    _warmed_up = True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            z = np.zeros((2, 3), np.float32)
            table = np.array([0.0, 1.0, 2.0], np.float32)
            accumulate(z, np.zeros(3, np.int64), np.ones(3, np.bool_), True, 0, 3, table, 1, 0, np.float32(2.0),
                       True, True, True, True, np.zeros(3, np.int64), np.zeros(2, np.int64), np.zeros(1),
                       np.zeros(4, np.int64), np.zeros(2 * adaptive.NUM_BUCKETS, np.int64),
                       np.zeros(adaptive.NUM_BUCKETS), np.full(adaptive.NUM_BUCKETS, np.inf),
                       np.full(adaptive.NUM_BUCKETS, -np.inf))
    except Exception as err:  # an LLVM or numba failure: the eager path takes over
        _compile_error = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:300]
    return _compile_error


MAX_CLASSES = 32768  # label * C + prediction is an int32 key


def supports_state(state) -> bool:
    """Whether the kernel can add to `state`: its sums live in CPU memory (the kernel adds into them in place)
    and its confusion-matrix keys fit int32. Classwise ECE and BA-ECE are not computed by the kernel
    (`MetricState.add_extras` adds them)."""
    return state.bin_count.device.type == "cpu" and state.num_classes <= MAX_CLASSES


def accepts(logits: torch.Tensor) -> bool:
    """Whether a (C, n) block can go through the kernel: float32, or float16 as stored (read by its bits and
    converted a tile at a time), in CPU memory."""
    return logits.dtype in (torch.float32, torch.float16) and logits.device.type == "cpu" and logits.dim() == 2


def _as_numpy(t: torch.Tensor, dtype: torch.dtype) -> np.ndarray:
    if t.dtype != dtype:
        t = t.to(dtype)
    return t.detach().contiguous().numpy()


class FusedAccumulator:
    """Adds (C, n) float32 blocks to `MetricState`s of one configuration (classes, bins, rule, metrics) through
    the kernel. Make one with `create`, which returns None where the kernel cannot be used."""

    def __init__(self, state):
        self.num_classes = state.num_classes
        self.bins = state.bins
        self.rule = RULE_CODES[state.bin_rule]
        self.near_tol = near_tolerance(state.bins)
        self.table = state.binner.edge_table(torch.zeros(0, dtype=torch.float32)).numpy()  # e_0 .. e_B, 2
        self.want_nll = state.wants_nll
        self.want_brier = state.wants_brier
        self.want_fine = state.wants_adaptive
        self._no_pred = np.empty(0, np.int64)
        self._no_fine = (np.empty(0, np.int64), np.empty(0, np.float64), np.empty(0, np.float64),
                         np.empty(0, np.float64))

    @classmethod
    def create(cls, state) -> Optional["FusedAccumulator"]:
        """An accumulator for states like `state`, or None when the kernel cannot serve them (see
        `supports_state`, `unavailable_reason`)."""
        if not supports_state(state) or unavailable_reason() is not None:
            return None
        return cls(state)

    def add(self, state, logits: torch.Tensor, labels: torch.Tensor, valid: Optional[torch.Tensor] = None,
            pred_out: Optional[torch.Tensor] = None) -> None:
        """Add every voxel of `logits` (C, n) float32 (see `accepts`) with `labels` (n,) and `valid` (n,) bool
        (None: all valid) to `state`; `pred_out` (n,) int64, if given, receives every voxel's prediction."""
        n = labels.shape[0]
        if n == 0:
            return
        z = logits.detach().contiguous().numpy()
        if z.dtype == np.float16:
            z = z.view(np.uint16)  # numba has no float16: the kernel converts the bits (_tile_source)
        y = _as_numpy(labels, torch.int64)
        use_valid = valid is not None
        v = _as_numpy(valid, torch.bool) if use_valid else np.ones(1, np.bool_)
        pred = self._no_pred
        if pred_out is not None:
            if pred_out.dtype != torch.int64 or not pred_out.is_contiguous() or pred_out.shape[0] != n:
                raise ValueError("pred_out must be a contiguous int64 tensor of one entry per voxel")
            pred = pred_out.numpy()
        fine = ((state.fine_count.numpy(), state.fine_conf.numpy(), state.fine_min.numpy(), state.fine_max.numpy())
                if self.want_fine else self._no_fine)
        voxels, nll_sum, brier_sum, bad = accumulate(
            z, y, v, use_valid, 0, n, self.table, self.bins, self.rule, self.near_tol, self.want_nll,
            self.want_brier, self.want_fine, pred_out is not None, pred, state.bin_count.numpy(),
            state.bin_conf.numpy(), state.confusion.numpy(), *fine)
        state.add_sums(int(voxels), float(nll_sum), float(brier_sum))
        if bad >= 0:
            raise ValueError(f"label {int(labels[bad])} outside [0, {self.num_classes}) at voxel {bad} of a block")
