"""The data layer: containers, layouts, class axis, input kinds, validity, chunk-aligned streaming."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import zarr

from segcal_cli.errors import InputError
from segcal_cli.io import DataOptions, open_dataset
from segcal_cli.io.blocks import plan, region_size

RNG = np.random.default_rng(1234)


def write_h5(path: Path, arrays: dict, chunks: dict | None = None, compression=None) -> Path:
    chunks = chunks or {}
    with h5py.File(path, "w") as f:
        for key, value in arrays.items():
            f.create_dataset(key, data=value, chunks=chunks.get(key), compression=compression)
    return path


def write_zarr(path: Path, arrays: dict, chunks: dict | None = None, shards: dict | None = None) -> Path:
    chunks = chunks or {}
    shards = shards or {}
    group = zarr.open_group(str(path), mode="w")
    for key, value in arrays.items():
        parent = group
        parts = key.split("/")
        for part in parts[:-1]:
            parent = parent.require_group(part)
        arr = parent.create_array(parts[-1], shape=value.shape, dtype=value.dtype,
                                  chunks=chunks.get(key, value.shape), shards=shards.get(key))
        arr[...] = value
    return path


def collect(ds, **kw):
    """Reassemble every case from its blocks; also check each voxel is delivered exactly once."""
    out = {}
    seen = {}
    for block in ds.stream(**kw):
        case = ds.cases[block.case_index]
        if block.case_id not in out:
            out[block.case_id] = {
                "logits": np.full((case.num_classes, *case.spatial_shape), np.nan),
                "labels": np.full(case.spatial_shape, -7, dtype=np.int64),
                "valid": np.zeros(case.spatial_shape, dtype=bool),
            }
            seen[block.case_id] = np.zeros(case.spatial_shape, dtype=np.int64)
        assert block.logits.dtype == torch.float32 and block.logits.shape[1] == math.prod(block.shape)
        rec = out[block.case_id]
        rec["logits"][(slice(None), *block.region)] = block.logits.double().numpy().reshape(-1, *block.shape)
        if block.labels is not None:
            rec["labels"][block.region] = block.labels.numpy().reshape(block.shape)
        rec["valid"][block.region] = block.valid.numpy().reshape(block.shape)
        seen[block.case_id][block.region] += 1
    for case_id, count in seen.items():
        assert (count == 1).all(), f"{case_id}: voxels delivered {np.unique(count)} times"
    return out


# --- block planning ------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape,chunks,maxv", [
    ((37, 41), (16, 16), 100), ((37, 41), (16, 16), 256), ((37, 41), (16, 16), 5000),
    ((7, 13, 5), (3, 4, 5), 7), ((7, 13, 5), (3, 4, 5), 61), ((7, 13, 5), None, 20),
    ((1000,), (64,), 1), ((5, 5), (100, 100), 3), ((9, 11, 13), (9, 11, 13), 10 ** 6),
])
def test_plan_covers_every_voxel_once_within_bound(shape, chunks, maxv):
    count = np.zeros(shape, dtype=np.int64)
    chunk_size = math.prod(min(c, s) for c, s in zip(chunks, shape)) if chunks else shape[-1]
    for unit in plan(shape, chunks, maxv):
        for block in unit.blocks:
            count[block] += 1
            assert region_size(block) <= max(maxv, 1)
            for b, u in zip(block, unit.region):
                assert u.start <= b.start < b.stop <= u.stop
        # a read unit is whole chunks (or one chunk when a chunk exceeds the bound)
        assert region_size(unit.region) <= max(maxv, chunk_size)
        if chunks:
            for s, c, n in zip(unit.region, chunks, shape):
                assert s.start % c == 0 and (s.stop % c == 0 or s.stop == n)
    assert (count == 1).all()


# --- layouts and containers ---------------------------------------------------------------------------

def _case_arrays(n=None, c=4, spatial=(9, 10)):
    lead = (n,) if n else ()
    logits = RNG.normal(size=(*lead, c, *spatial)).astype(np.float32)
    labels = RNG.integers(0, c, size=(*lead, *spatial)).astype(np.uint8)
    return logits, labels


def test_hdf5_single_case_root(tmp_path):
    logits, labels = _case_arrays()
    path = write_h5(tmp_path / "one.h5", {"logits": logits, "labels": labels})
    with open_dataset([str(path)], require_labels=True) as ds:
        assert [c.id for c in ds.cases] == ["one"] and ds.num_classes == 4
        got = collect(ds)["one"]
    np.testing.assert_array_equal(got["logits"], logits)
    np.testing.assert_array_equal(got["labels"], labels)


def test_hdf5_batched_root_and_case_ids(tmp_path):
    logits, labels = _case_arrays(n=3, spatial=(7, 11))
    path = write_h5(tmp_path / "batch.hdf5", {"logits": logits, "labels": labels},
                    chunks={"logits": (1, 4, 4, 4), "labels": (1, 4, 4)}, compression="gzip")
    with open_dataset([str(path)], DataOptions(chunk_voxels=5), require_labels=True) as ds:
        assert [c.id for c in ds.cases] == ["batch[0]", "batch[1]", "batch[2]"]
        got = collect(ds)
    for i in range(3):
        np.testing.assert_array_equal(got[f"batch[{i}]"]["logits"], logits[i])
        np.testing.assert_array_equal(got[f"batch[{i}]"]["labels"], labels[i])


def test_zarr_groups_zip_directory_and_glob(tmp_path):
    cases = {name: _case_arrays(c=3, spatial=(4, 5, 6)) for name in ("b_case", "a_case")}
    arrays = {}
    for name, (lg, lb) in cases.items():
        arrays[f"{name}/logits"] = lg
        arrays[f"{name}/labels"] = lb
    store = write_zarr(tmp_path / "data" / "vol.zarr", arrays, chunks={k: (v.shape[0], 2, 3, 4) if v.ndim == 4
                                                                      else (2, 3, 4) for k, v in arrays.items()})
    # the same store zipped
    zpath = tmp_path / "data" / "vol2.zarr.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        for root, _, files in os.walk(store):
            for f in files:
                full = Path(root) / f
                zf.write(full, full.relative_to(store).as_posix())
    for args in ([str(store)], [str(zpath)], [str(tmp_path / "data")], [str(tmp_path / "data" / "*.zar*")]):
        with open_dataset(args, require_labels=True) as ds:
            ids = [c.id for c in ds.cases]
            got = collect(ds)
        assert all(i.endswith(("/a_case", "/b_case")) for i in ids)
        assert ids == sorted(ids)  # groups sorted, files sorted
        for cid in ids:
            name = cid.split("/")[-1]
            np.testing.assert_array_equal(got[cid]["logits"], cases[name][0])
            np.testing.assert_array_equal(got[cid]["labels"], cases[name][1])
    with open_dataset([str(tmp_path / "data")], require_labels=True) as ds:
        assert [c.id for c in ds.cases] == ["vol/a_case", "vol/b_case", "vol2/a_case", "vol2/b_case"]


def test_sharded_zarr_and_contiguous_hdf5_stream_exactly(tmp_path):
    logits, labels = _case_arrays(c=5, spatial=(13, 17, 11))
    zpath = write_zarr(tmp_path / "s.zarr", {"logits": logits, "labels": labels},
                       chunks={"logits": (5, 2, 4, 4), "labels": (2, 4, 4)},
                       shards={"logits": (5, 4, 8, 8), "labels": (4, 8, 8)})
    hpath = write_h5(tmp_path / "c.h5", {"logits": logits, "labels": labels})  # contiguous
    with h5py.File(hpath) as f:
        assert f["logits"].chunks is None
    for path in (zpath, hpath):
        for cv in (1, 50, 333, 10 ** 6):
            with open_dataset([str(path)], DataOptions(chunk_voxels=cv), require_labels=True) as ds:
                got = collect(ds)[ds.cases[0].id]
            np.testing.assert_array_equal(got["logits"], logits)
            np.testing.assert_array_equal(got["labels"], labels)


# --- class axis ------------------------------------------------------------------------------------

def test_class_axis_auto_last_and_explicit(tmp_path):
    logits, labels = _case_arrays(c=3, spatial=(6, 7, 8))
    last = np.moveaxis(logits, 0, -1).copy()  # MONAI style (H, W, D, C)
    path = write_h5(tmp_path / "last.h5", {"logits": last, "labels": labels})
    with open_dataset([str(path)], require_labels=True) as ds:
        assert ds.cases[0].class_axis == 3
        got = collect(ds)["last"]
    np.testing.assert_array_equal(got["logits"], logits)
    with open_dataset([str(path)], DataOptions(class_axis=-1), require_labels=True) as ds:
        assert ds.cases[0].class_axis == 3


def test_ambiguous_class_axis_asks_for_it(tmp_path):
    logits = RNG.normal(size=(4, 4, 4, 4)).astype(np.float32)
    labels = RNG.integers(0, 4, size=(4, 4, 4)).astype(np.uint8)
    path = write_h5(tmp_path / "amb.h5", {"logits": logits, "labels": labels})
    with pytest.raises(InputError, match="ambiguous class axis.*--class-axis"):
        open_dataset([str(path)], require_labels=True)
    with open_dataset([str(path)], DataOptions(class_axis=0), require_labels=True) as ds:
        assert len(ds.cases) == 1 and ds.cases[0].class_axis == 0


def test_shape_mismatch_is_reported(tmp_path):
    path = write_h5(tmp_path / "mm.h5", {"logits": np.zeros((3, 5, 6), np.float32),
                                         "labels": np.zeros((5, 7), np.uint8)})
    with pytest.raises(InputError, match=r"mm.h5.*do(es)? not match"):
        open_dataset([str(path)], require_labels=True)


# --- input kinds, ignore, mask --------------------------------------------------------------------------

def _logsoftmax(x, axis=0):
    m = x.max(axis=axis, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=axis, keepdims=True))


def test_input_kinds_give_the_same_distribution(tmp_path):
    logits, labels = _case_arrays(c=4, spatial=(8, 9))
    logp = _logsoftmax(logits.astype(np.float64)).astype(np.float32)
    probs = np.exp(logp)
    probs[0, 0, 0], probs[1:, 0, 0] = 1.0, 0.0  # exact 0 and 1, as nnU-Net padding writes
    results = {}
    for kind, arr in (("logits", logits), ("logprobs", logp), ("probs", probs)):
        path = write_h5(tmp_path / f"{kind}.h5", {"logits": arr, "labels": labels})
        with open_dataset([str(path)], DataOptions(input_kind=kind), require_labels=True) as ds:
            got = collect(ds)[kind]["logits"]
        assert np.isfinite(got).all()
        results[kind] = _logsoftmax(got)
    np.testing.assert_allclose(results["logprobs"], results["logits"], atol=1e-5)
    ok = np.ones((8, 9), bool)
    ok[0, 0] = False
    np.testing.assert_allclose(results["probs"][:, ok], results["logits"][:, ok], atol=1e-4)
    assert results["probs"][0, 0, 0] > -1e-6  # p = 1 stays the certain class


def test_single_channel_is_a_binary_sigmoid_logit(tmp_path):
    z = RNG.normal(size=(1, 6, 7)).astype(np.float32) * 3
    labels = RNG.integers(0, 2, size=(6, 7)).astype(np.uint8)
    path = write_h5(tmp_path / "bin.h5", {"logits": z, "labels": labels})
    with open_dataset([str(path)], require_labels=True) as ds:
        assert ds.num_classes == 2
        got = collect(ds)["bin"]["logits"]
    p1 = np.exp(_logsoftmax(got))[1]
    np.testing.assert_allclose(p1, 1 / (1 + np.exp(-z[0].astype(np.float64))), rtol=1e-6)
    # the same as probabilities
    path = write_h5(tmp_path / "binp.h5", {"logits": (1 / (1 + np.exp(-z))).astype(np.float32), "labels": labels})
    with open_dataset([str(path)], DataOptions(input_kind="probs"), require_labels=True) as ds:
        got_p = collect(ds)["binp"]["logits"]
    np.testing.assert_allclose(np.exp(_logsoftmax(got_p))[1], p1, atol=1e-6)


def test_ignore_index_and_mask_define_valid(tmp_path):
    logits, labels = _case_arrays(c=3, spatial=(10, 12))
    labels[:2] = 255
    mask = np.ones((10, 12), np.uint8)
    mask[:, :3] = 0
    path = write_h5(tmp_path / "m.h5", {"logits": logits, "labels": labels, "roi": mask})
    with open_dataset([str(path)], DataOptions(mask_key="roi", chunk_voxels=7), require_labels=True) as ds:
        got = collect(ds)["m"]
    expected = (labels != 255) & (mask != 0)
    np.testing.assert_array_equal(got["valid"], expected)
    assert (got["labels"][~expected & (labels == 255)] == 0).all()  # safe to gather with
    # a different ignore index makes 255 an error, named with its count
    with pytest.raises(InputError, match=r"24 labels outside \[0, 3\)"):
        with open_dataset([str(path)], DataOptions(ignore_index=-100), require_labels=True) as ds:
            collect(ds)


# --- bad input: one line naming the file and the case -------------------------------------------------------

def _bad(tmp_path, arrays, **opts):
    path = write_h5(tmp_path / "bad.h5", arrays)
    with pytest.raises(InputError) as info:
        with open_dataset([str(path)], DataOptions(**opts), require_labels=True) as ds:
            collect(ds)
    message = str(info.value)
    assert "\n" not in message and "bad.h5" in message
    return message


def test_bad_inputs_are_named(tmp_path):
    lg, lb = _case_arrays(c=3, spatial=(5, 6))
    assert "missing key 'labels'" in _bad(tmp_path, {"logits": lg})
    assert "missing key 'logits'" in _bad(tmp_path, {"scores": lg, "labels": lb})
    nan = lg.copy()
    nan[0, :2, :3] = np.nan
    nan[1, 4, 5] = np.inf
    assert "7 NaN or Inf" in _bad(tmp_path, {"logits": nan, "labels": lb})
    assert "outside [0, 1]" in _bad(tmp_path, {"logits": lg, "labels": lb}, input_kind="probs")
    all_ignored = np.full_like(lb, 255)
    assert "every voxel is ignored" in _bad(tmp_path, {"logits": lg, "labels": all_ignored})
    assert "empty" in _bad(tmp_path, {"logits": np.zeros((3, 0, 6), np.float32), "labels": np.zeros((0, 6), np.uint8)})
    assert "non-numeric" in _bad(tmp_path, {"logits": lg.astype("S4"), "labels": lb})
    assert "floating-point" in _bad(tmp_path, {"logits": lg, "labels": lb.astype(np.float32)})
    with pytest.raises(InputError, match="no such file"):
        open_dataset([str(tmp_path / "absent.h5")])
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(InputError, match="unsupported file type"):
        open_dataset([str(tmp_path / "x.txt")])
    (tmp_path / "corrupt.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\x00" * 200)
    with pytest.raises(InputError, match="corrupt"):
        open_dataset([str(tmp_path / "corrupt.h5")])


def test_class_count_must_agree_across_cases(tmp_path):
    a = write_h5(tmp_path / "a.h5", dict(zip(("logits", "labels"), _case_arrays(c=3))))
    b = write_h5(tmp_path / "b.h5", dict(zip(("logits", "labels"), _case_arrays(c=4))))
    with pytest.raises(InputError, match="b.h5.*4 classes but a has 3"):
        open_dataset([str(a), str(b)], require_labels=True)


# --- the stream does not depend on the block size; memory is bounded by it ----------------------------------

def test_stream_statistics_independent_of_chunk_voxels(tmp_path):
    logits, labels = _case_arrays(n=2, c=6, spatial=(23, 29))
    labels[0, 3:5] = 255
    path = write_h5(tmp_path / "s.h5", {"logits": logits.astype(np.float16), "labels": labels},
                    chunks={"logits": (1, 6, 8, 8), "labels": (1, 8, 8)})
    sums = set()  # (nll sum, valid count) per block size
    for cv in (1, 17, 64, 500, 10 ** 7):
        total = torch.zeros((), dtype=torch.float64)
        nll = torch.zeros((), dtype=torch.float64)
        with open_dataset([str(path)], DataOptions(chunk_voxels=cv), require_labels=True) as ds:
            for block in ds.stream():
                lse = torch.logsumexp(block.logits, 0)
                picked = block.logits.gather(0, block.labels[None])[0]
                nll += (lse - picked)[block.valid].double().sum()
                total += block.valid.sum()
        sums.add((float(nll), int(total)))
    # the per-voxel values are identical; only the float64 summation order differs between block sizes
    values = sorted(sums)
    assert len({t for _, t in values}) == 1
    assert values[-1][0] - values[0][0] <= 1e-9 * abs(values[0][0])


MEMORY_SCRIPT = r"""
import resource, sys, numpy as np
from segcal_cli.io import DataOptions, open_dataset
path, cv = sys.argv[1], int(sys.argv[2])
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
n = 0
with open_dataset([path], DataOptions(chunk_voxels=cv), require_labels=True) as ds:
    for block in ds.stream():
        n += block.num_voxels
print(n, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) // 1024)
"""


def test_stream_memory_is_bounded_by_block_not_data(tmp_path):
    # 6 cases x 8 classes x 256 x 256 float16 = 50 MB of logits (200 MB as float32) in 64x64 chunks.
    path = tmp_path / "big.h5"
    with h5py.File(path, "w") as f:
        lg = f.create_dataset("logits", shape=(6, 8, 256, 256), dtype="f2", chunks=(1, 8, 64, 64))
        lb = f.create_dataset("labels", shape=(6, 256, 256), dtype="u1", chunks=(1, 64, 64))
        for i in range(6):
            lg[i] = RNG.normal(size=(8, 256, 256)).astype(np.float16)
            lb[i] = RNG.integers(0, 8, size=(256, 256))
    out = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(path), "4096"], capture_output=True,
                         text=True, check=True)
    voxels, grown_mb = map(int, out.stdout.split())
    assert voxels == 6 * 256 * 256
    # the whole data as float32 would be 200 MB; a bounded stream grows by a few MB of blocks at most
    assert grown_mb < 40, f"peak RSS grew by {grown_mb} MB while streaming"


# --- atomic writes, shared by artifacts, JSON reports and plots -----------------------------------------

def test_atomic_path_leaves_whole_file_or_nothing(tmp_path):
    from segcal_cli.io.files import atomic_path

    target = tmp_path / "report.json"
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp != target
        tmp.write_text("whole")
    assert target.read_text() == "whole"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("partial")
            raise RuntimeError("interrupted")
    assert target.read_text() == "whole"  # the old file is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]  # no temporary left behind


def test_cli_sets_the_allocator_before_any_thread():
    """segcal_cli.memory: glibc keeps freed blocks (no page faults per block); runs once, idempotent."""
    code = ("import segcal_cli.memory as m, sys; m.reuse_freed_memory(); first = m._done; "
            "m.reuse_freed_memory(); print(first, m._done)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    expected = "True" if sys.platform.startswith("linux") else "False"
    assert out == [expected, expected]


def test_a_warm_stream_does_not_fault_in_fresh_pages(tmp_path):
    """Once warm, a pass over the data reuses freed blocks: minor page faults far below the pages streamed
    (without segcal_cli.memory every block was a fresh mmap, ~1 fault per 4 KiB of float32 logits)."""
    cases = 24  # the untuned count grows with the data; the tuned one stays at the jitter of the peak (~2,000)
    path = write_h5(tmp_path / "big.h5", {"logits": RNG.normal(size=(cases, 8, 256, 512)).astype(np.float16),
                                          "labels": RNG.integers(0, 8, size=(cases, 256, 512)).astype(np.uint8)},
                    {"logits": (1, 8, 128, 128), "labels": (1, 128, 128)})
    code = f"""
import resource, segcal_cli.memory as m
m.reuse_freed_memory()
from segcal_cli.io import DataOptions, open_dataset
ds = open_dataset([{str(path)!r}], DataOptions(device="cpu"))
for _ in range(2):
    for _ in ds.stream(): pass
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in ds.stream(): pass
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
    faults = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    float32_pages = cases * 8 * 256 * 512 * 4 // 4096  # 24576
    assert faults < float32_pages // 4, faults
