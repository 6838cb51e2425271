"""`segcal apply`: the written output equals the calibrator's forward pass computed in memory, in the input's
layout (shape, class axis, chunk grid), with labels / mask copied and self-describing attributes."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_apply_data import assert_matches, open_group, read, reference, write_h5, write_zarr  # noqa: E402

from segcal_cli.calibrators import METHODS, get_method  # noqa: E402
from segcal_cli.io import DataOptions, open_dataset  # noqa: E402
from segcal_cli.applying import apply_calibrator  # noqa: E402

C = 4
RNG = np.random.default_rng(7)
SUFFIXES = {"hdf5": ".h5", "zarr": ".zarr", "zarr-zip": ".zarr.zip"}


def _logits(shape, scale=3.0):
    return (RNG.normal(size=shape) * scale).astype(np.float32)


def _labels(shape, ignore=True):
    lab = RNG.integers(0, C, size=shape).astype(np.uint8)
    if ignore:
        lab.flat[::7] = 255
    return lab


def _input(tmp_path, fmt, arrays, chunks, name="val"):
    if fmt == "hdf5":
        return write_h5(tmp_path / f"{name}.h5", arrays, chunks)
    return write_zarr(tmp_path / f"{name}{SUFFIXES[fmt]}", arrays, chunks)


def _run(inputs, cal, out, kind="probabilities", dtype="float32", **opts):
    with open_dataset([str(p) for p in inputs], DataOptions(**opts)) as ds:
        return apply_calibrator(ds, cal, out, kind=kind, dtype=dtype)


# -- every family, every input / output format, odd chunk grids ---------------------------------------
FORMAT_PAIRS = [("hdf5", "hdf5"), ("zarr", "zarr"), ("zarr-zip", "zarr-zip"), ("hdf5", "zarr"), ("zarr", "hdf5")]


# each family once, the format pairs rotating over the families (every pair is met at least twice)
@pytest.mark.parametrize("method,in_fmt,out_fmt",
                         [(m, *FORMAT_PAIRS[i % len(FORMAT_PAIRS)]) for i, m in enumerate(METHODS)])
def test_every_family_equals_in_memory_forward(tmp_path, method, in_fmt, out_fmt):
    logits, labels = _logits((C, 5, 9, 11)), _labels((5, 9, 11))
    src = _input(tmp_path, in_fmt, {"logits": logits, "labels": labels}, {"logits": (C, 2, 4, 5), "labels": (2, 4, 5)})
    cal = get_method(method).random(C, torch.Generator().manual_seed(3))
    out = tmp_path / f"out{SUFFIXES[out_fmt]}"
    _run([src], cal, out)
    assert_matches(read(out, "probabilities"), reference(cal, logits, 0, "probabilities"), "float32", "probabilities")
    np.testing.assert_array_equal(read(out, "labels"), labels)


@pytest.mark.parametrize("fmt,kind,dtype", [
    ("hdf5", "logits", "float16"), ("hdf5", "probabilities", "float16"), ("hdf5", "logits", "float32"),
    ("zarr", "probabilities", "float16"), ("zarr", "logits", "float32"), ("zarr-zip", "logits", "float16"),
    ("zarr-zip", "probabilities", "float32"),
])
def test_output_kinds_and_dtypes(tmp_path, fmt, kind, dtype):
    logits = _logits((C, 13, 17))
    src = _input(tmp_path, fmt, {"logits": logits, "labels": _labels((13, 17))}, {"logits": (3, 5, 6), "labels": (5, 6)})
    cal = get_method("ms").random(C, torch.Generator().manual_seed(1))
    out = tmp_path / f"out{SUFFIXES[fmt]}"
    _run([src], cal, out, kind=kind, dtype=dtype)
    assert_matches(read(out, kind), reference(cal, logits, 0, kind), dtype, kind)
    group = open_group(out)
    try:
        arr = group[kind]
        attrs = dict(arr.attrs)
        assert attrs["kind"] == kind and attrs["calibrator_method"] == "ms" and attrs["class_axis"] == 0
        assert attrs["ignore_index"] == 255
        if fmt == "hdf5":
            assert arr.chunks == (3, 5, 6)
            assert [str(n) for n in attrs["dimension_names"]] == ["class", "y", "x"]
        else:
            assert tuple(arr.chunks) == (3, 5, 6)
            assert tuple(arr.metadata.dimension_names) == ("class", "y", "x")
    finally:
        if hasattr(group, "close"):
            group.close()


def test_chunk_larger_than_block_is_assembled_and_written_whole(tmp_path):
    """--chunk-voxels smaller than one storage chunk: blocks are gathered into the chunk before writing."""
    logits = _logits((C, 6, 20, 20))
    src = write_zarr(tmp_path / "in.zarr.zip", {"logits": logits}, {"logits": (C, 3, 20, 20)})
    cal = get_method("ts").random(C, torch.Generator().manual_seed(0))
    out = tmp_path / "out.zarr.zip"
    _run([src], cal, out, chunk_voxels=150)
    assert_matches(read(out, "probabilities"), reference(cal, logits, 0, "probabilities"), "float32", "probabilities")
    import zipfile

    names = zipfile.ZipFile(out).namelist()
    assert len(names) == len(set(names)), "a zip entry was written twice (a chunk written in pieces)"


# -- layouts ----------------------------------------------------------------------------------------------
def test_batched_root_arrays_keep_the_batch_axis(tmp_path):
    logits, labels = _logits((3, C, 8, 10)), _labels((3, 8, 10))
    src = write_h5(tmp_path / "val.h5", {"logits": logits, "labels": labels}, {"logits": (2, C, 3, 4), "labels": (2, 3, 4)})
    cal = get_method("vs").random(C, torch.Generator().manual_seed(2))
    out = tmp_path / "out.zarr"
    _run([src], cal, out)
    written = read(out, "probabilities")
    for n in range(3):
        assert_matches(written[n], reference(cal, logits[n], 0, "probabilities"), "float32", "probabilities")
    np.testing.assert_array_equal(read(out, "labels"), labels)
    with open_dataset([str(out)], DataOptions(logits_key="probabilities", input_kind="probs")) as ds:
        assert [c.id for c in ds.cases] == ["out[0]", "out[1]", "out[2]"]
        assert ds.cases[0].layout == "batched"


def test_group_per_case_and_several_files_one_group_per_stem(tmp_path):
    a = {"case_1/logits": _logits((C, 6, 7)), "case_1/labels": _labels((6, 7)),
         "case_2/logits": _logits((C, 5, 9)), "case_2/labels": _labels((5, 9))}
    (tmp_path / "d1").mkdir()
    (tmp_path / "d2").mkdir()
    f1 = write_h5(tmp_path / "d1" / "val.h5", a)
    single = _logits((C, 3, 5))
    f2 = write_zarr(tmp_path / "d2" / "val.zarr", {"logits": single, "labels": _labels((3, 5))})
    f3 = write_zarr(tmp_path / "d2" / "test.zarr", {"logits": single, "labels": _labels((3, 5))})
    cal = get_method("dc").random(C, torch.Generator().manual_seed(4))
    out = tmp_path / "out.h5"
    result = _run([f1, f2, f3], cal, out)
    assert result.arrays == ["val/case_1/probabilities", "val/case_2/probabilities", "val-2/probabilities",
                             "test/probabilities"]
    for key in ("case_1", "case_2"):
        assert_matches(read(out, f"val/{key}/probabilities"), reference(cal, a[f"{key}/logits"], 0, "probabilities"),
                       "float32", "probabilities")
        np.testing.assert_array_equal(read(out, f"val/{key}/labels"), a[f"{key}/labels"])
    assert_matches(read(out, "val-2/probabilities"), reference(cal, single, 0, "probabilities"), "float32",
                   "probabilities")
    with open_dataset([str(out)], DataOptions(logits_key="probabilities", input_kind="probs"),
                      require_labels=True) as ds:
        assert sorted(c.id for c in ds.cases) == ["out/test", "out/val-2", "out/val/case_1", "out/val/case_2"]


def test_single_group_input_mirrors_its_groups(tmp_path):
    arrays = {"a/logits": _logits((C, 6, 5)), "a/labels": _labels((6, 5)), "b/logits": _logits((C, 3, 5)),
              "b/labels": _labels((3, 5))}
    src = write_zarr(tmp_path / "val.zarr", arrays)
    out = tmp_path / "out.zarr.zip"
    cal = get_method("ts").random(C, torch.Generator().manual_seed(0))
    result = _run([src], cal, out)
    assert result.arrays == ["a/probabilities", "b/probabilities"]
    np.testing.assert_array_equal(read(out, "b/labels"), arrays["b/labels"])


def test_class_axis_last_and_mask_copied(tmp_path):
    logits, labels = _logits((9, 7, C)), _labels((9, 7))
    mask = (RNG.random((9, 7)) > 0.3).astype(np.uint8)
    src = write_h5(tmp_path / "val.h5", {"logits": logits, "labels": labels, "roi": mask},
                   {"logits": (4, 3, C), "labels": (4, 3), "roi": (4, 3)})
    cal = get_method("ms-ti").random(C, torch.Generator().manual_seed(5))
    out = tmp_path / "out.h5"
    _run([src], cal, out, kind="logits", mask_key="roi")
    written = read(out, "logits")
    assert_matches(written, reference(cal, logits, 2, "logits"), "float32", "logits")
    np.testing.assert_array_equal(read(out, "roi"), mask)
    group = open_group(out)
    try:
        assert group["logits"].attrs["class_axis"] == 2
        assert [str(n) for n in group["logits"].attrs["dimension_names"]] == ["y", "x", "class"]
        assert group["logits"].chunks == (4, 3, C)
    finally:
        group.close()


def test_binary_single_channel_writes_one_channel_read_back_as_two_classes(tmp_path):
    z = _logits((1, 6, 8))
    labels = RNG.integers(0, 2, size=(6, 8)).astype(np.uint8)
    src = write_zarr(tmp_path / "val.zarr", {"logits": z, "labels": labels})
    cal = get_method("ts").from_parameters(2, {"temperature": 2.0})
    for kind in ("probabilities", "logits"):
        out = tmp_path / f"out_{kind}.zarr"
        _run([src], cal, out, kind=kind)
        written = read(out, kind)
        assert written.shape == (1, 6, 8)
        expected = 1 / (1 + np.exp(-z / 2.0)) if kind == "probabilities" else z / 2.0
        np.testing.assert_allclose(written, expected, rtol=1e-5, atol=1e-6)


def test_contiguous_hdf5_and_sharded_zarr_inputs(tmp_path):
    logits = _logits((C, 10, 12))
    contiguous = write_h5(tmp_path / "c.h5", {"logits": logits}, {"logits": None})
    cal = get_method("vs-ti").random(C, torch.Generator().manual_seed(6))
    out_h5, out_zarr = tmp_path / "c_out.h5", tmp_path / "c_out.zarr.zip"
    _run([contiguous], cal, out_h5, chunk_voxels=30)
    _run([contiguous], cal, out_zarr, chunk_voxels=30)
    for out in (out_h5, out_zarr):
        assert_matches(read(out, "probabilities"), reference(cal, logits, 0, "probabilities"), "float32",
                       "probabilities")
    group = open_group(out_h5)
    assert group["probabilities"].chunks is None  # contiguous in, contiguous out
    group.close()
    sharded = write_zarr(tmp_path / "s.zarr", {"logits": logits}, {"logits": (C, 2, 3)}, shards={"logits": (C, 4, 6)})
    out = tmp_path / "s_out.zarr"
    _run([sharded], cal, out)
    assert_matches(read(out, "probabilities"), reference(cal, logits, 0, "probabilities"), "float32", "probabilities")
    group = open_group(out)
    assert tuple(group["probabilities"].chunks) == (C, 2, 3) and tuple(group["probabilities"].shards) == (C, 4, 6)


def test_root_attributes_describe_the_content(tmp_path):
    src = write_h5(tmp_path / "val.h5", {"logits": _logits((C, 4, 4))})
    cal = get_method("ts").random(C, torch.Generator().manual_seed(0))
    out = tmp_path / "out.zarr"
    _run([src], cal, out, ignore_index=-100)
    group = open_group(out)
    attrs = dict(group.attrs)
    assert attrs["kind"] == "probabilities" and attrs["num_classes"] == C and attrs["ignore_index"] == -100
    assert attrs["calibrator_method"] == "ts"


def test_temperature_scaling_folds_into_the_softmax():
    """`apply` computes softmax(z / T) without a forward pass (softmax_scale); same numbers as forward +
    softmax; every other family says it is not a pure rescaling."""
    import torch

    from segcal_cli.applying import calibrated_output
    from segcal_cli.calibrators import get_method
    from segcal_cli.calibrators.registry import METHODS

    z = torch.randn(7, 5000, generator=torch.Generator().manual_seed(3)) * 6
    cal = get_method("ts").from_parameters(7, {"temperature": torch.tensor(1.7)})
    assert cal.softmax_scale() == pytest.approx(1 / 1.7)
    expected = torch.softmax(cal.forward(z).double(), 0)
    # float32: a few ulp (exp2 of a rounded argument); float16: its rounding, 2^-11 relative, 2^-24 absolute
    for dtype, rel, absolute in ((torch.float32, 4e-6, 1e-30), (torch.float16, 2.0 ** -10, 2.0 ** -24)):
        got = calibrated_output(cal, z, "probabilities", False, dtype).double()
        assert bool(((got - expected).abs() <= rel * expected + absolute).all()), dtype
    for name in METHODS:
        if name != "ts":
            assert get_method(name).identity(7).softmax_scale() is None, name


@pytest.mark.parametrize("method", ["ts", "vs"])
def test_float16_input_gives_the_float32_results(tmp_path, method, monkeypatch):
    """float16 logits: temperature scaling reads them as stored (the stream keeps float16 for the numba
    softmax), other families get float32 blocks; either way the output is that of the float32 values."""
    from segcal_cli import applying

    monkeypatch.setenv("SEGCAL_NUMBA", "1")  # the kernels at any size
    logits16 = (_logits((2, C, 33, 47), 5.0)).astype(np.float16)
    labels = _labels((2, 33, 47))
    chunks = {"logits": (1, C, 16, 16), "labels": (1, 16, 16)}
    path16 = write_h5(tmp_path / "h.h5", {"logits": logits16, "labels": labels}, chunks)
    path32 = write_h5(tmp_path / "s.h5", {"logits": logits16.astype(np.float32), "labels": labels}, chunks)
    cal = get_method(method).random(C, torch.Generator().manual_seed(2)) if method != "ts" else \
        get_method("ts").from_parameters(C, {"temperature": torch.tensor(1.3)})
    outs = {}
    for name, path in (("half", path16), ("single", path32)):
        ds = open_dataset([str(path)], DataOptions(device="cpu"))
        assert ds.num_classes == C and len(ds.cases) == 2
        if name == "half":
            assert applying._reads_float16(cal, "probabilities", ds) == (method == "ts" and
                                                                          __import__("segcal_cli.fastmath").fastmath.kernels() is not None)
        out = tmp_path / f"{name}_out.h5"
        apply_calibrator(ds, cal, out, dtype="float32")
        outs[name] = read(out, "probabilities")
    np.testing.assert_array_equal(outs["half"], outs["single"])


def test_small_runs_do_not_load_numba(tmp_path):
    """Below fastmath.MIN_VALUES apply and evaluate stay on torch: no numba import (~0.6 s) for small data."""
    import subprocess

    path = write_h5(tmp_path / "s.h5", {"logits": _logits((2, C, 20, 20)).astype(np.float16),
                                        "labels": _labels((2, 20, 20))},
                    {"logits": (1, C, 16, 16), "labels": (1, 16, 16)})
    code = f"""
import sys, torch
from pathlib import Path
from segcal_cli.io import DataOptions, open_dataset
from segcal_cli.applying import apply_calibrator
from segcal_cli.calibrators import get_method
from segcal_cli.metrics.evaluation import Evaluation
ds = open_dataset([{str(path)!r}], DataOptions(device="cpu"))
cal = get_method("ts").from_parameters({C}, {{"temperature": torch.tensor(1.2)}})
apply_calibrator(ds, cal, Path({str(tmp_path / "o.h5")!r}))
ev = Evaluation(ds.num_classes, [c.id for c in ds.cases], [c.num_voxels for c in ds.cases])
for b in ds.stream(keep_float16=ev.fused):
    ev.add_block(b.case_index, b.logits, b.labels, b.valid)
ev.finish()
print("numba" in sys.modules)
"""
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("SEGCAL_NUMBA", "SEGCAL_FUSED")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.strip() == "False"
