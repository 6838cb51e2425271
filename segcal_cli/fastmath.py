"""numba kernels for the CPU hot loops of streaming and `segcal apply`, with a vectorised float32 exp.

What is here: `exp_nonpositive` (also used by metrics/fused.py); float16 <-> float32 (`half_to_float` with a
NaN/Inf count, `finite_half_bits_to_float` for checked data, `half_bits_of_unit` rounding probabilities to
float16 bit-exactly as numpy does; F16C instructions where the CPU has them); `count_nonfinite_half` and
`count_nonfinite_single`; `labels_and_valid_u8`; and apply's `softmax_tiles`.

Why. The softmax of `apply` is one exp per stored value, 1e9 of them for the 2 GB benchmark file, and
torch's CPU exp ran at 1.2-1.6 ns per value on this project's machines (AMD EPYC, AVX2, torch 2.13): scalar
speed (exp2: 0.8 ns). An exp written as plain float32 arithmetic (a polynomial after range reduction, the
power of two added to the exponent bits) is vectorised by LLVM to 8 lanes: 0.31 ns per value, within ~1 ulp.
The softmax kernel then makes one pass over cache-sized tiles of the (C, n) logits (max, exp, sum, scale,
round to the output dtype) instead of six torch operations with their temporaries: ~0.8 ns per value from
float16 to float16 in cache on one core (2.1 ns before the F16C conversions and the vectorised class max),
against ~2.2 ns for the tuned torch version (docs/apply.md). The float16 conversions and checks are
memory-bound single passes that replace two or three torch passes.

Things that matter to LLVM, found by measuring: indices are unsigned (numba adds negative-index wraparound
to signed ones, which stops vectorisation: 3.1 -> 1.4 s); fastmath is only "contract" (FMAs; no
reassociation, so each voxel's classes are summed in index order 0..C-1 and a voxel's result does not depend
on where blocks are cut); the class loop is outside the voxel loop; kernels are module-level functions
(numba caches those on disk; closures compiled again in every process).

numba is a dependency, but every caller keeps a torch path: small data (kernel_choice.py), SEGCAL_NUMBA=0,
a missing or broken numba, CUDA tensors and float64 all use it. Compiled code is cached on disk
(cache=True) when the package directory is writable, so only the first run on a machine compiles.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

TILE = 512  # voxels per tile: (C, TILE) float32 scratch of 39 KB for 19 classes stays in L1/L2

_f32 = np.float32
_i32 = np.int32
_u64 = np.uint64

# exp(x), x <= 0: x = n ln2 + r, |r| <= ln2/2, exp(r) by a degree-6 polynomial; 2^n added to the exponent bits.
_LOG2E = _f32(1.4426950408889634)
_ROUND_MAGIC = _f32(12582912.0)  # 1.5 * 2^23: adding it rounds |v| < 2^22 to the nearest integer
_LN2_HI = _f32(0.693359375)  # ln 2 in two parts; n * _LN2_HI is exact
_LN2_LO_NEG = _f32(2.12194440e-4)
_EXP_FLOOR = _f32(-87.0)  # below: exp(-87) = 1.6e-38, still a normal float32 (no denormals)
_E2 = _f32(0.4999999403953552)
_E3 = _f32(0.1666652113199234)
_E4 = _f32(0.04166838899254799)
_E5 = _f32(0.008368710055947304)
_E6 = _f32(0.0013814608100801706)
_ONE = _f32(1.0)
_TWO_24 = _f32(16777216.0)
_TWO_23 = _f32(8388608.0)
_F16_MIN_NORMAL_BITS = _i32(0x38800000)  # float32 bits of 2^-14

_error: Optional[str] = None
try:
    from numba import njit
except Exception as err:  # not installed or broken: every caller has a torch path
    njit = None
    _error = f"{type(err).__name__}: {err}"


def jit(**options):
    """numba.njit with the settings of every segcal kernel (this module's and metrics/fused.py's): only
    "contract" fastmath, numpy's error model, no bounds checks; compiled code cached on disk (module-level
    functions only: numba cannot cache closures, which compiled again in every process: 1.6 s per run), or
    compiled in every process where no cache directory is writable (numba refuses cache=True there)."""
    if njit is None:
        return lambda fn: None
    options = dict(fastmath={"contract"}, error_model="numpy", boundscheck=False, **options)

    def decorate(fn):
        try:
            return njit(cache=True, **options)(fn)
        except RuntimeError:
            return njit(cache=False, **options)(fn)

    return decorate



@jit(inline="always")
def exp_nonpositive(x):
    """float32 exp(x) for x <= 0 (x < -87 gives exp(-87)); exp(0) = 1 exactly."""
    x = x if x > _EXP_FLOOR else _EXP_FLOOR
    t = x * _LOG2E + _ROUND_MAGIC
    n = t - _ROUND_MAGIC  # nearest integer to x / ln 2
    r = x - n * _LN2_HI
    r = r + n * _LN2_LO_NEG
    p = _E6
    p = p * r + _E5
    p = p * r + _E4
    p = p * r + _E3
    p = p * r + _E2
    p = p * r + _ONE
    p = p * r + _ONE
    # t = 1.5 * 2^23 + n: its low bits hold n, so (bits of t) << 23 adds n to p's exponent
    return np.int32(np.float32(p).view(np.int32) + (np.float32(t).view(np.int32) << _i32(23))).view(np.float32)

# log(x), x normal and > 0 (Cephes logf): x = 2^e m, m in [sqrt(1/2), sqrt(2)), log(1 + f) by a polynomial
# (evaluate's NLL, metrics/fused.py).
_SQRT_HALF = _f32(0.707106781186547524)
_HALF = _f32(0.5)
_L0 = _f32(7.0376836292e-2)
_L1 = _f32(-1.1514610310e-1)
_L2 = _f32(1.1676998740e-1)
_L3 = _f32(-1.2420140846e-1)
_L4 = _f32(1.4249322787e-1)
_L5 = _f32(-1.6668057665e-1)
_L6 = _f32(2.0000714765e-1)
_L7 = _f32(-2.4999993993e-1)
_L8 = _f32(3.3333331174e-1)


@jit(inline="always")
def log_positive(x):
    """float32 log(x) for a positive normal x."""
    bits = np.float32(x).view(np.int32)
    e = _i32((bits >> _i32(23)) - _i32(126))
    m = np.int32((bits & _i32(0x007FFFFF)) | _i32(0x3F000000)).view(np.float32)  # [1/2, 1)
    small = m < _SQRT_HALF
    f = (m + m - _ONE) if small else (m - _ONE)
    ef = _f32(e - _i32(1)) if small else _f32(e)
    z = f * f
    y = _L0
    y = y * f + _L1
    y = y * f + _L2
    y = y * f + _L3
    y = y * f + _L4
    y = y * f + _L5
    y = y * f + _L6
    y = y * f + _L7
    y = y * f + _L8
    y = y * f * z
    y = y - ef * _LN2_LO_NEG
    y = y - _HALF * z
    return (f + y) + ef * _LN2_HI


@jit(inline="always")
def _soft_half_bits_of_unit(p):
    """IEEE float16 bits of a float32 p in [0, 1], rounded to nearest even (as torch / numpy round), in
    float32 / int32 arithmetic (CPUs without F16C)."""
    bits = np.float32(p).view(np.int32)
    normal = ((bits + _i32(0xFFF) + ((bits >> _i32(13)) & _i32(1))) >> _i32(13)) - _i32(112 << 10)
    # below 2^-14 float16 is subnormal: p * 2^24 rounded to an integer (adding 2^23 rounds it)
    sub = np.float32(p * _TWO_24 + _TWO_23).view(np.int32) - _i32(0x4B000000)
    return np.uint16(normal if bits >= _F16_MIN_NORMAL_BITS else sub)

_TWO_M24 = _f32(2.0 ** -24)


@jit(inline="always")
def _soft_half_bits_to_float(h):
    """float32 value of the float16 whose bits are h (an integer). Exact (every float16 is a float32), with
    no denormal arithmetic (a float16 subnormal is its 10-bit integer times 2^-24, a normal float32), so
    flush-to-zero modes cannot change it."""
    h = _i32(h)
    magnitude = h & _i32(0x7FFF)
    exponent = h & _i32(0x7C00)
    normal = np.int32((magnitude << _i32(13)) + _i32(112 << 23)).view(np.float32)
    special = np.int32((magnitude << _i32(13)) | _i32(0x7F800000)).view(np.float32)  # Inf, NaN
    small = _f32(h & _i32(0x3FF)) * _TWO_M24
    value = small if exponent == 0 else (special if exponent == _i32(0x7C00) else normal)
    return np.int32(np.float32(value).view(np.int32) | ((h & _i32(0x8000)) << _i32(16))).view(np.float32)


_TWO_112 = _f32(2.0 ** 112)


@jit(inline="always")
def _soft_finite_half_bits_to_float(h):
    """float32 value of the bits h of a *finite* float16, in two operations: the bits moved into a float32's
    place scale it by 2^-112, undone by one exact multiplication (float16 subnormals pass through float32
    subnormals, exact unless the CPU flushes them: `finite_half_conversion_is_exact` checks that)."""
    h = _i32(h)
    scaled = np.int32((h & _i32(0x7FFF)) << _i32(13)).view(np.float32) * _TWO_112
    return np.int32(np.float32(scaled).view(np.int32) | ((h & _i32(0x8000)) << _i32(16))).view(np.float32)


# --- float16 <-> float32 in hardware --------------------------------------------------------------------
# numba has no float16 type on the CPU, so the kernels hold float16 as its uint16 bits. x86 CPUs with F16C
# (all since 2012) convert 8 values per instruction (vcvtph2ps / vcvtps2ph); LLVM emits them for an IR
# `fpext half` / `fptrunc ... to half`, which these two intrinsics write, and vectorises the loops around
# them. Both are exact conversions (fptrunc rounds to nearest even, as numpy and torch do). They made apply's
# softmax (float16 in and out) 2.7x faster than the float32 / int32 arithmetic above: 2.1 -> 0.77 ns per
# value on one core of this project's machine. Without F16C (or numba) the arithmetic versions are used.


def _host_has_f16c() -> bool:
    try:
        from llvmlite import binding as llvm

        return "+f16c" in llvm.get_host_cpu_features().flatten().split(",")
    except Exception:
        return False


HARDWARE_HALF = njit is not None and _host_has_f16c()

if njit is not None:
    from llvmlite import ir
    from numba.core import types as _types
    from numba.extending import intrinsic

    @intrinsic
    def _hw_half_to_float(typingctx, h):
        if not isinstance(h, _types.Integer) or h.bitwidth != 16:
            return None

        def codegen(context, builder, signature, args):
            return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

        return _types.float32(h), codegen

    @intrinsic
    def _hw_float_to_half(typingctx, x):
        if not isinstance(x, _types.Float) or x.bitwidth != 32:
            return None

        def codegen(context, builder, signature, args):
            return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))

        return _types.uint16(x), codegen
else:
    _hw_half_to_float = _hw_float_to_half = None


@jit(inline="always")
def half_bits_of_unit(p):
    """IEEE float16 bits of a float32 p in [0, 1], rounded to nearest even (as torch / numpy round)."""
    if HARDWARE_HALF:  # a compile-time constant to numba: one branch is compiled
        return _hw_float_to_half(np.float32(p))
    return _soft_half_bits_of_unit(p)


@jit(inline="always")
def half_bits_to_float(h):
    """float32 value of the float16 whose bits are h (an integer); exact, NaN and Inf included."""
    if HARDWARE_HALF:
        return _hw_half_to_float(np.uint16(h))
    return _soft_half_bits_to_float(h)


@jit(inline="always")
def finite_half_bits_to_float(h):
    """float32 value of the bits h of a *finite* float16 (the kernels' input, checked by the stream)."""
    if HARDWARE_HALF:
        return _hw_half_to_float(np.uint16(h))
    return _soft_finite_half_bits_to_float(h)


@jit()
def _finite_half_values(bits, out):
    for i in range(bits.shape[0]):
        out[i] = finite_half_bits_to_float(bits[i])


_exact_checked: Optional[bool] = None


def finite_half_conversion_is_exact() -> bool:
    """(Cached) whether finite_half_bits_to_float gives every finite float16 exactly on this thread (a CPU flushing
    subnormals to zero would break it for the smallest values); the kernels use the exact slow form if not."""
    global _exact_checked
    if _exact_checked is not None:
        return _exact_checked
    if njit is None:
        return False
    bits = np.arange(65536, dtype=np.uint16)
    bits = bits[(bits & 0x7C00) != 0x7C00]
    out = np.empty(bits.shape, np.float32)
    _finite_half_values(bits, out)
    _exact_checked = bool(np.array_equal(out.view(np.uint32), bits.view(np.float16).astype(np.float32).view(np.uint32)))
    return _exact_checked


def as_float32(x):
    """A stored logit as float32: itself for float32, the value of its bits for a finite float16 stored as
    uint16 (finite_half_bits_to_float). Kernels written with it read either dtype (numba compiles one version
    per dtype)."""
    return np.float32(x)


if njit is not None:
    from numba.core import types
    from numba.extending import overload

    @overload(as_float32, inline="always")
    def _as_float32_overload(x):
        if isinstance(x, types.Integer):  # float16 bits of a finite value (streams check them)
            def from_half_bits(x):
                return finite_half_bits_to_float(x)

            return from_half_bits
        if isinstance(x, types.Float):
            def from_float(x):
                return np.float32(x)

            return from_float
        return None


@jit(nogil=True)
def half_to_float(src, dst):
    """dst = float32 values of the float16 bits `src` (uint16), both flat and of one length; returns how many
    are NaN or Inf."""
    bad = 0
    for i in range(_u64(src.shape[0])):
        h = src[i]
        dst[i] = half_bits_to_float(h)
        bad += (_i32(h) & _i32(0x7C00)) == _i32(0x7C00)
    return bad


@jit(nogil=True)
def count_nonfinite_half(src):
    """How many of the float16 bits `src` (uint16, flat) are NaN or Inf."""
    bad = 0
    for i in range(_u64(src.shape[0])):
        bad += (_i32(src[i]) & _i32(0x7C00)) == _i32(0x7C00)
    return bad


@jit(nogil=True)
def count_nonfinite_single(src):
    """How many of the float32 values `src` (flat) are NaN or Inf (from their bits)."""
    bits = src.view(np.uint32)
    bad = 0
    for i in range(_u64(bits.shape[0])):
        bad += (bits[i] & np.uint32(0x7F800000)) == np.uint32(0x7F800000)
    return bad


@jit(nogil=True)
def softmax_tiles(z, out, out_stride, out_offset, C, n, scale, half):
    """Softmax over classes of z, a flat C-contiguous (C, n) float32 array (or the uint16 bits of a float16
    one), of s * z (s = `scale` > 0).
    Row k of the result goes to out[k * out_stride + out_offset + j]; `out` is float32, or (half=True)
    the uint16 view of a float16 array."""
    e = np.empty(C * TILE, np.float32)  # exp(s (z - max)) of the tile, until the sum is known
    top = np.empty(TILE, np.float32)
    total = np.empty(TILE, np.float32)
    nn = _u64(n)
    T = _u64(TILE)
    for t0 in range(0, n, TILE):
        w = _u64(min(TILE, n - t0))
        t = _u64(t0)
        for j in range(w):
            top[j] = as_float32(z[t + j])
            total[j] = 0.0
        for k in range(1, C):
            b = _u64(k) * nn + t
            for j in range(w):
                # np.maximum vectorises (a select did not: 0.48 -> 0.14 ns per value); the logits are finite,
                # and a max of +0 or -0 shifts every logit alike
                top[j] = np.maximum(top[j], as_float32(z[b + j]))
        for k in range(C):  # in class order: the sum does not depend on the tiling
            b = _u64(k) * nn + t
            q = _u64(k) * T
            for j in range(w):
                x = exp_nonpositive((as_float32(z[b + j]) - top[j]) * scale)
                e[q + j] = x
                total[j] += x
        for j in range(w):
            total[j] = _ONE / total[j]
        for k in range(C):
            o = _u64(k) * _u64(out_stride) + _u64(out_offset) + t
            q = _u64(k) * T
            if half:
                for j in range(w):
                    out[o + j] = half_bits_of_unit(e[q + j] * total[j])
            else:
                for j in range(w):
                    out[o + j] = e[q + j] * total[j]


@jit(nogil=True)
def labels_and_valid_u8(stored, ignore, labels, valid):
    """uint8 labels as stored -> int64 labels (0 where ignored) and validity, in one pass; returns the largest
    label that is not the ignore value (-1 if none), for the caller's range check."""
    top = -1
    for i in range(_u64(stored.shape[0])):
        y = _i32(stored[i])
        keep = y != ignore
        labels[i] = y if keep else 0
        valid[i] = keep
        y = y if keep else _i32(-1)
        top = y if y > top else top
    return top


def kernels() -> Optional[dict]:
    """The compiled kernels, or None when SEGCAL_NUMBA=0 or numba cannot be used here (`error()` says why)."""
    from segcal_cli import kernel_choice

    if njit is None or kernel_choice.setting() is False:
        return None
    return {"exp_nonpositive": exp_nonpositive, "half_bits_of_unit": half_bits_of_unit,
            "softmax_tiles": softmax_tiles, "half_to_float": half_to_float,
            "count_nonfinite_half": count_nonfinite_half, "count_nonfinite_single": count_nonfinite_single,
            "labels_and_valid_u8": labels_and_valid_u8}


def error() -> Optional[str]:
    return _error


def softmax_into(z, out, scale: float = 1.0) -> bool:
    """out = softmax over dim 0 of scale * z, for z a (C, m) float32 or float16 CPU tensor and out a (C, m) float32 or
    float16 CPU tensor whose rows may be strided (a column slice of a bigger array). False (nothing written)
    when the kernel cannot run here: the caller then uses torch."""
    import torch

    if (z.device.type != "cpu" or out.device.type != "cpu" or z.dtype not in (torch.float32, torch.float16)
            or z.dim() != 2
            or out.dtype not in (torch.float32, torch.float16) or out.shape != z.shape or out.stride(1) != 1
            or not scale > 0):
        return False
    found = kernels()
    if found is None:
        return False
    C, m = z.shape
    z = z.contiguous()
    base = out
    offset = out.storage_offset()
    flat = torch.as_strided(base, (base.untyped_storage().nbytes() // base.element_size(),), (1,), 0)
    half = out.dtype == torch.float16
    target = flat.view(torch.int16).numpy().view(np.uint16) if half else flat.numpy()
    stride = out.stride(0) if C > 1 else m
    source = z.reshape(-1).numpy()
    if z.dtype == torch.float16:
        source = source.view(np.uint16)  # numba has no float16: the kernel reads the bits (as_float32)
    found["softmax_tiles"](source, target, stride, offset, C, m, np.float32(scale), half)
    return True
