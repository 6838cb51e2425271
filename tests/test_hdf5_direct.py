"""Direct HDF5 chunk reads (io/hdf5_direct.py): the same values as h5py for every read the planner makes, the
zero-copy path where the layout allows it, and h5py wherever the stored bytes are not the values as they are."""

from __future__ import annotations

import os

import h5py
import numpy as np
import pytest
import torch

from segcal_cli.errors import InputError
from segcal_cli.io import DataOptions, open_dataset
from segcal_cli.io.blocks import plan
from segcal_cli.io.containers import Container
from segcal_cli.io.hdf5_direct import DirectChunkReader

RNG = np.random.default_rng(7)


def _case_indices(shape, chunks, class_axis, batched, max_voxels):
    """The logits indices the engine reads for every unit of every case (as CaseInfo.logits_index)."""
    spatial = [s for i, s in enumerate(shape[1 if batched else 0:]) if i != class_axis]
    spatial_chunks = [c for i, c in enumerate(chunks[1 if batched else 0:]) if i != class_axis]
    for b in range(shape[0] if batched else 1):
        for unit in plan(tuple(spatial), tuple(spatial_chunks), max_voxels):
            index = list(unit.region)
            index.insert(class_axis, slice(None))
            yield tuple(([b] if batched else []) + index)


LAYOUTS = [
    # shape, chunks, class axis (per case), batched
    ((3, 5, 37, 50), (1, 5, 16, 16), 0, True),  # classes first, edge chunks on both axes
    ((3, 40, 48, 4), (1, 8, 16, 4), 2, True),  # classes last
    ((5, 20, 24, 18), (5, 8, 8, 6), 0, False),  # 3D volume, one case
    ((6, 64, 64), (6, 16, 64), 0, False),  # chunks spanning the whole row
    ((4, 7, 33), (2, 7, 11), 0, False),  # a chunk holding only some classes
]


@pytest.mark.parametrize("shape,chunks,class_axis,batched", LAYOUTS)
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("max_voxels", [64, 1000, 1 << 18])
def test_direct_reads_equal_h5py(tmp_path, shape, chunks, class_axis, batched, dtype, max_voxels):
    data = RNG.normal(size=shape).astype(dtype)
    path = tmp_path / "x.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("logits", data=data, chunks=chunks)
    with Container(path) as container:
        array = container.get_array("logits")
        assert DirectChunkReader.eligible(array)
        read = container.reader(array)
        for index in _case_indices(shape, chunks, class_axis, batched, max_voxels):
            got = read(index)
            assert got.dtype == data.dtype
            np.testing.assert_array_equal(got, array[index])


def test_column_units_scatter_whole_chunks_without_a_copy(tmp_path):
    """Classes first, chunks (C, h, w): a column unit puts every whole chunk in C contiguous runs."""
    path = tmp_path / "x.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("logits", data=RNG.normal(size=(2, 4, 64, 64)).astype(np.float16), chunks=(1, 4, 16, 16))
    with Container(path) as container:
        reader = DirectChunkReader(container.get_array("logits"), os.open(path, os.O_RDONLY))
        unit = plan((64, 64), (16, 16), 1024)[0]
        assert [s.stop - s.start for s in unit.region] == [64, 16]  # a column along the first axis
        runs = reader._runs((0, 0, 16, 0), (1, 4, 64, 16))
        assert runs == [(c * 64 * 16 + 16 * 16, 16 * 16) for c in range(4)]
        assert reader._runs((0, 0, 16, 0), (1, 4, 64, 16)) is runs  # memoised: every unit repeats them


def test_ineligible_datasets_are_read_by_h5py(tmp_path):
    data = RNG.normal(size=(3, 32, 32)).astype(np.float32)
    path = tmp_path / "x.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("gzip", data=data, chunks=(3, 16, 16), compression="gzip")
        f.create_dataset("contiguous", data=data)
        f.create_dataset("big_endian", data=data.astype(">f4"), chunks=(3, 16, 16))
    with Container(path) as container:
        for key in ("gzip", "contiguous", "big_endian"):
            array = container.get_array(key)
            assert not DirectChunkReader.eligible(array), key
            np.testing.assert_array_equal(container.reader(array)((slice(None), slice(0, 16), slice(0, 32))),
                                          data[:, :16, :])
    with h5py.File(tmp_path / "ub.h5", "w", userblock_size=512) as f:
        f.create_dataset("logits", data=data, chunks=(3, 16, 16))
    with Container(tmp_path / "ub.h5") as container:
        assert not DirectChunkReader.eligible(container.get_array("logits"))


def test_unallocated_chunks_and_off_grid_reads_fall_back(tmp_path):
    path = tmp_path / "x.h5"
    with h5py.File(path, "w") as f:
        ds = f.create_dataset("logits", shape=(2, 32, 32), dtype=np.float32, chunks=(2, 16, 16), fillvalue=-3.0)
        ds[:, :16, :16] = 1.0  # the other three chunks are never written
    with Container(path) as container:
        array = container.get_array("logits")
        read = container.reader(array)
        assert DirectChunkReader.eligible(array)
        np.testing.assert_array_equal(read((slice(None), slice(0, 32), slice(0, 16))), array[:, :, :16])
        np.testing.assert_array_equal(read((slice(None), slice(3, 20), slice(5, 9))), array[:, 3:20, 5:9])


@pytest.mark.parametrize("index_limit", [0, 1 << 16])
def test_chunk_addresses_from_the_index_or_per_chunk_read_the_same(tmp_path, monkeypatch, index_limit):
    """The reader asks HDF5 for the whole chunk index once (up to INDEX_LIMIT chunks), else per chunk; an
    unallocated chunk is missing from the index and falls back to h5py either way. One reader (and one index)
    per dataset and container, shared by every case of a batched array."""
    monkeypatch.setattr(DirectChunkReader, "INDEX_LIMIT", index_limit)
    data = RNG.normal(size=(3, 4, 40, 40)).astype(np.float16)
    path = tmp_path / "x.h5"
    with h5py.File(path, "w") as f:
        ds = f.create_dataset("logits", shape=data.shape, dtype=data.dtype, chunks=(1, 4, 16, 16), fillvalue=2.0)
        ds[0] = data[0]
        ds[2, :, :16] = data[2, :, :16]  # case 1 and most of case 2 never written
    with Container(path) as container:
        array = container.get_array("logits")
        read = container.reader(array)
        assert container.reader(array).__self__ is read.__self__
        reader = read.__self__
        for index in _case_indices(data.shape, (1, 4, 16, 16), 0, True, 256):
            np.testing.assert_array_equal(read(index), array[index])
        assert (reader._index is False) == (index_limit == 0)
        if index_limit:
            assert len(reader._index) == 9 + 3  # case 0 whole, case 2's first row of chunks


def test_a_short_read_falls_back_to_h5py(tmp_path):
    """Bytes missing where HDF5 says a chunk is (a truncated file): the direct reader does not return a
    partly filled array, it hands the read to h5py (which then reads or reports the file)."""
    path = tmp_path / "x.h5"
    data = RNG.normal(size=(3, 64, 64)).astype(np.float32)
    with h5py.File(path, "w") as f:
        f.create_dataset("logits", data=data, chunks=(3, 16, 16))
    short = tmp_path / "short.bin"
    short.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    fd = os.open(short, os.O_RDONLY)
    try:
        with Container(path) as container:
            reader = DirectChunkReader(container.get_array("logits"), fd)
            np.testing.assert_array_equal(reader.read((slice(None), slice(0, 64), slice(48, 64))), data[:, :, 48:])
    finally:
        os.close(fd)


def test_container_closes_its_descriptor(tmp_path):
    path = tmp_path / "x.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("logits", data=np.zeros((2, 16, 16), np.float32), chunks=(2, 8, 8))
    container = Container(path)
    container.reader(container.get_array("logits"))((slice(None), slice(0, 8), slice(0, 8)))
    fd = container._fd
    assert fd is not None
    container.close()
    with pytest.raises(OSError):
        os.fstat(fd)


def test_stream_of_direct_and_h5py_reads_is_identical(tmp_path):
    """Whole streams through the engine: the unfiltered file (direct reads) and a gzip copy (h5py) agree."""
    logits = RNG.normal(size=(3, 4, 50, 70)).astype(np.float16)
    labels = RNG.integers(0, 4, size=(3, 50, 70)).astype(np.uint8)
    for name, compression in (("plain.h5", None), ("gzip.h5", "gzip")):
        with h5py.File(tmp_path / name, "w") as f:
            f.create_dataset("logits", data=logits, chunks=(1, 4, 16, 16), compression=compression)
            f.create_dataset("labels", data=labels, chunks=(1, 16, 16), compression=compression)
    streams = {}
    for name in ("plain.h5", "gzip.h5"):
        ds = open_dataset([str(tmp_path / name)], DataOptions(chunk_voxels=600))
        streams[name] = [(b.case_index, b.region, b.logits.clone(), b.labels.clone()) for b in ds.stream()]
    assert len(streams["plain.h5"]) == len(streams["gzip.h5"])
    for a, b in zip(streams["plain.h5"], streams["gzip.h5"]):
        assert a[:2] == b[:2]
        assert bool((a[2] == b[2]).all()) and bool((a[3] == b[3]).all())


@pytest.mark.parametrize("shape,chunks,class_axis,batched", LAYOUTS)
def test_direct_writes_equal_h5py_writes(tmp_path, shape, chunks, class_axis, batched):
    """Every read unit written through DirectChunkWriter into an early-allocated dataset reads back as the
    data; edge chunks included (their part outside the array is not part of the dataset)."""
    from segcal_cli.io.hdf5_direct import DirectChunkWriter, early_allocation

    if batched:
        chunks = (1, *chunks[1:])
    data = RNG.normal(size=shape).astype(np.float16)
    path = tmp_path / "out.h5"
    with h5py.File(path, "w") as f:
        ds = f.create_dataset("p", shape=shape, dtype=np.float16, chunks=chunks, dcpl=early_allocation())
        assert DirectChunkWriter.eligible(ds)
        fd = os.open(path, os.O_WRONLY)
        try:
            writer = DirectChunkWriter(ds, fd)
            for index in _case_indices(shape, chunks, class_axis, batched, 1000):
                writer[index] = data[index]
        finally:
            os.close(fd)
    with h5py.File(path, "r") as f:
        np.testing.assert_array_equal(f["p"][...], data)


def test_writer_needs_early_allocation_and_falls_back_off_grid(tmp_path):
    from segcal_cli.io.hdf5_direct import DirectChunkWriter, early_allocation

    path = tmp_path / "out.h5"
    with h5py.File(path, "w") as f:
        late = f.create_dataset("late", shape=(2, 32, 32), dtype=np.float32, chunks=(2, 16, 16))
        assert not DirectChunkWriter.eligible(late)  # chunk addresses unknown before the first write
        early = f.create_dataset("early", shape=(2, 32, 32), dtype=np.float32, chunks=(2, 16, 16),
                                 dcpl=early_allocation())
        fd = os.open(path, os.O_WRONLY)
        try:
            writer = DirectChunkWriter(early, fd)
            writer[:, 0:32, 0:32] = np.ones((2, 32, 32), np.float32)
            writer[:, 3:9, 5:7] = np.full((2, 6, 2), 7.0, np.float32)  # not whole chunks: through h5py
        finally:
            os.close(fd)
    expected = np.ones((2, 32, 32), np.float32)
    expected[:, 3:9, 5:7] = 7.0
    with h5py.File(path, "r") as f:
        np.testing.assert_array_equal(f["early"][...], expected)


def test_float16_conversion_kernel_equals_torch_and_counts_bad_values(tmp_path, monkeypatch):
    """Large float16 data is converted by fastmath.half_to_float (conversion and finiteness check in one
    pass): the same float32 blocks as torch's conversion, and the same error for NaN / Inf."""
    from segcal_cli import engine, fastmath, kernel_choice

    if fastmath.kernels() is None:
        pytest.skip(f"numba kernels unavailable: {fastmath.error()}")
    logits = RNG.normal(size=(2, 5, 40, 60)).astype(np.float16) * 20
    logits[0, 1, 0, :3] = [np.float16(6e-8), np.float16(-0.0), np.float16(65504)]  # subnormal, -0, max
    labels = RNG.integers(0, 5, size=(2, 40, 60)).astype(np.uint8)
    with h5py.File(tmp_path / "x.h5", "w") as f:
        f.create_dataset("logits", data=logits, chunks=(1, 5, 16, 16))
        f.create_dataset("labels", data=labels, chunks=(1, 16, 16))
    streams = {}
    for threshold in (10**18, 0):  # torch, then the kernel
        monkeypatch.setattr(kernel_choice, "MIN_VALUES", threshold)
        ds = open_dataset([str(tmp_path / "x.h5")], DataOptions(device="cpu"))
        assert (engine._half_kernels(ds, torch.device("cpu"), False) is not None) == (threshold == 0)
        streams[threshold] = [b.logits.clone() for b in ds.stream()]
    for a, b in zip(streams[10**18], streams[0]):
        assert torch.equal(a.view(torch.int32), b.view(torch.int32))  # bit for bit, -0.0 included
    logits[1, 2, 5, 5] = np.nan
    logits[1, 3, 7, 9] = -np.inf
    with h5py.File(tmp_path / "bad.h5", "w") as f:
        f.create_dataset("logits", data=logits, chunks=(1, 5, 16, 16))
        f.create_dataset("labels", data=labels, chunks=(1, 16, 16))
    ds = open_dataset([str(tmp_path / "bad.h5")], DataOptions(device="cpu"))
    with pytest.raises(InputError, match="2 NaN or Inf"):
        for _ in ds.stream():
            pass


@pytest.mark.parametrize("class_axis", [0, 2])
def test_keep_float16_delivers_the_stored_values_checked(tmp_path, class_axis):
    """stream(keep_float16=True): float16 (C, n) blocks holding exactly the values of the float32 stream,
    classes first whatever the stored layout; NaN / Inf still stop the stream with their count."""
    from segcal_cli import fastmath

    if fastmath.kernels() is None:
        pytest.skip(f"numba kernels unavailable: {fastmath.error()}")
    logits = (RNG.normal(size=(2, 6, 30, 40)) * 8).astype(np.float16)
    logits[0, 0, 0, :2] = [np.float16(6e-8), np.float16(-0.0)]
    if class_axis == 2:
        logits = np.ascontiguousarray(np.moveaxis(logits, 1, 3))  # (N, H, W, C)
    labels = RNG.integers(0, 6, size=(2, 30, 40)).astype(np.uint8)
    chunks = (1, 6, 16, 16) if class_axis == 0 else (1, 16, 16, 6)
    with h5py.File(tmp_path / "x.h5", "w") as f:
        f.create_dataset("logits", data=logits, chunks=chunks)
        f.create_dataset("labels", data=labels, chunks=(1, 16, 16))
    opts = DataOptions(device="cpu", class_axis=None if class_axis == 0 else class_axis)
    ds = open_dataset([str(tmp_path / "x.h5")], opts)
    kept = list(ds.stream(keep_float16=True))
    plain = list(ds.stream())
    assert all(b.logits.dtype == torch.float16 and b.logits.shape[0] == 6 for b in kept)
    for a, b in zip(kept, plain):
        assert a.region == b.region
        assert torch.equal(a.logits.float().view(torch.int32), b.logits.view(torch.int32))
        assert torch.equal(a.labels, b.labels) and torch.equal(a.valid, b.valid)
    bad = logits.copy()
    bad.flat[17] = np.inf
    with h5py.File(tmp_path / "bad.h5", "w") as f:
        f.create_dataset("logits", data=bad, chunks=chunks)
        f.create_dataset("labels", data=labels, chunks=(1, 16, 16))
    with pytest.raises(InputError, match="1 NaN or Inf"):
        for _ in open_dataset([str(tmp_path / "bad.h5")], opts).stream(keep_float16=True):
            pass


def test_the_two_operation_float16_conversion_is_exact_here():
    from segcal_cli import fastmath

    if fastmath.kernels() is None:
        pytest.skip(f"numba kernels unavailable: {fastmath.error()}")
    assert fastmath.finite_half_conversion_is_exact()


def test_label_kernel_reports_bad_labels_like_torch(tmp_path):
    """uint8 labels go through fastmath.labels_and_valid_u8 in a kept-float16 stream: same labels and
    validity as torch's path (tested above), the same error for a label outside the classes."""
    from segcal_cli import fastmath

    if fastmath.kernels() is None:
        pytest.skip(f"numba kernels unavailable: {fastmath.error()}")
    logits = RNG.normal(size=(1, 4, 20, 20)).astype(np.float16)
    labels = RNG.integers(0, 4, size=(1, 20, 20)).astype(np.uint8)
    labels[0, 3, 3] = 9
    labels[0, 5, 5] = 255
    with h5py.File(tmp_path / "x.h5", "w") as f:
        f.create_dataset("logits", data=logits, chunks=(1, 4, 16, 16))
        f.create_dataset("labels", data=labels, chunks=(1, 16, 16))
    ds = open_dataset([str(tmp_path / "x.h5")], DataOptions(device="cpu"))
    for keep in (True, False):
        with pytest.raises(InputError, match=r"1 labels outside \[0, 4\).*\(e.g. 9\)"):
            for _ in ds.stream(keep_float16=keep):
                pass
