"""segcal_cli.fastmath: the vectorised exp, float16 rounding and the softmax kernel of `apply`."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from segcal_cli import fastmath

pytestmark = pytest.mark.skipif(fastmath.kernels() is None, reason=f"numba kernels unavailable: {fastmath.error()}")


def _apply_scalar(name: str, values: np.ndarray, out_dtype) -> np.ndarray:
    from numba import njit

    fn = getattr(fastmath, name)

    @njit
    def run(a, o):
        for i in range(a.shape[0]):
            o[i] = fn(a[i])

    out = np.empty(values.shape, out_dtype)
    run(values, out)
    return out


def test_exp_is_within_two_ulp_on_its_domain():
    rng = np.random.default_rng(0)
    x = np.concatenate([-rng.random(200_000) * 87, -rng.random(50_000) * 1e-3,
                        np.array([0.0, -1e-30, -0.5, -87.0, -86.99])]).astype(np.float32)
    got = _apply_scalar("exp_nonpositive", x, np.float32)
    exact = np.exp(x.astype(np.float64))
    ulp = np.spacing(exact.astype(np.float32)).astype(np.float64)
    assert np.max(np.abs(got - exact) / ulp) <= 2.0
    assert got[x == 0].tolist() == [1.0]  # exp(0) exactly: the top class of a softmax
    below = _apply_scalar("exp_nonpositive", np.array([-100.0, -1e4], np.float32), np.float32)
    assert np.all(below == np.float32(np.exp(np.float64(-87.0))).astype(np.float32)) or np.all(below < 1.7e-38)


@pytest.mark.parametrize("name", ["half_bits_of_unit", "_soft_half_bits_of_unit"])
def test_float16_rounding_equals_numpy(name):
    """The F16C instruction (HARDWARE_HALF) and the arithmetic used without it round as numpy does."""
    rng = np.random.default_rng(1)
    p = np.concatenate([rng.random(500_000), rng.random(200_000) * 1e-4, rng.random(50_000) * 1e-7,
                        [0.0, 1.0, 2.0 ** -14, 2.0 ** -24, 2.0 ** -25, 3 * 2.0 ** -26, 1 - 2.0 ** -12,
                         1 - 2.0 ** -11, np.nextafter(2.0 ** -14, 0)]]).astype(np.float32)
    got = _apply_scalar(name, p, np.uint16)
    np.testing.assert_array_equal(got, p.astype(np.float16).view(np.uint16))


@pytest.mark.parametrize("name", ["half_bits_to_float", "_soft_half_bits_to_float",
                                  "finite_half_bits_to_float", "_soft_finite_half_bits_to_float"])
def test_float16_to_float32_is_exact_for_every_value(name):
    bits = np.arange(65536, dtype=np.uint16)
    expected = bits.view(np.float16).astype(np.float32)
    finite = np.isfinite(expected)
    if "finite" in name:
        bits, expected = bits[finite], expected[finite]
    got = _apply_scalar(name, bits, np.float32)
    nan = np.isnan(expected)
    np.testing.assert_array_equal(got[~nan].view(np.uint32), expected[~nan].view(np.uint32))
    assert np.isnan(got[nan]).all()


def test_this_machine_converts_float16_in_hardware():
    """Every x86-64 CPU since 2012 has F16C; CI machines do. Without it the kernels still work (the arithmetic
    versions above), slower."""
    import platform

    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("F16C is an x86 extension")
    assert fastmath.HARDWARE_HALF


@pytest.mark.parametrize("classes,voxels", [(2, 1), (5, 513), (19, 3000), (40, 1024)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_softmax_into_matches_torch_and_keeps_outside_rows(classes, voxels, dtype):
    gen = torch.Generator().manual_seed(classes * voxels)
    z = torch.randn(classes, voxels, generator=gen) * 6 + 40  # a large common offset: softmax ignores it
    z[0, :3] = 500.0  # every other class underflows
    big = torch.full((classes, voxels + 20), -7.0, dtype=dtype)
    out = big[:, 10:10 + voxels]
    assert fastmath.softmax_into(z, out, 0.6)
    expected = torch.softmax(z.double() * 0.6, 0)
    if dtype == torch.float32:
        assert bool(((out.double() - expected).abs() <= 4e-6 * expected + 1e-37).all())
    else:  # within one float16 step of the correctly rounded value
        steps = (out.view(torch.int16).int() - expected.float().half().view(torch.int16).int()).abs()
        assert int(steps.max()) <= 1
    assert bool((big[:, :10] == -7).all() and (big[:, 10 + voxels:] == -7).all())
    assert bool((out[0, :3] == 1).all())


def test_softmax_does_not_depend_on_how_the_block_is_cut():
    z = torch.randn(19, 5000, generator=torch.Generator().manual_seed(5)) * 4
    whole = torch.empty_like(z)
    pieces = torch.empty_like(z)
    fastmath.softmax_into(z, whole, 1.3)
    for start in range(0, 5000, 777):
        fastmath.softmax_into(z[:, start:start + 777], pieces[:, start:start + 777], 1.3)
    assert torch.equal(whole, pieces)


def test_torch_path_when_the_kernel_cannot_run():
    z = torch.randn(3, 10)
    assert not fastmath.softmax_into(z.double(), torch.empty(3, 10, dtype=torch.float64))
    assert not fastmath.softmax_into(z, torch.empty(3, 10), scale=-1.0)
    code = "import torch; from segcal_cli import fastmath; print(fastmath.softmax_into(torch.randn(3, 4), torch.empty(3, 4)))"
    env = {**os.environ, "SEGCAL_NUMBA": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
