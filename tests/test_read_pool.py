"""`Dataset.iter_raw(workers=..., ahead=..., then=...)`: reads (and their conversion) in a pool of threads,
delivered in order, errors in order, containers closed once no read of them is pending."""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_apply_data import write_h5, write_zarr  # noqa: E402

from segcal_cli import engine  # noqa: E402
from segcal_cli.errors import InputError  # noqa: E402
from segcal_cli.io import DataOptions, open_dataset  # noqa: E402

C = 3
RNG = np.random.default_rng(5)


def _files(tmp_path, count=4, shape=(C, 23, 37), chunks=(C, 8, 16)):
    """One case per file (several containers), odd shapes: edge chunks everywhere."""
    folder = tmp_path / "cases"
    folder.mkdir()
    for i in range(count):
        logits = RNG.normal(size=shape).astype(np.float16 if i % 2 else np.float32)
        labels = RNG.integers(0, C, size=shape[1:]).astype(np.uint8)
        if i == 3:
            write_zarr(folder / f"c{i}.zarr", {"logits": logits, "labels": labels},
                       {"logits": chunks, "labels": chunks[1:]})
        else:
            write_h5(folder / f"c{i}.h5", {"logits": logits, "labels": labels},
                     {"logits": chunks, "labels": chunks[1:]}, compression=None if i < 2 else "gzip")
    return folder


def _summary(raw):
    return raw.case_index, raw.unit.region, raw.logits.copy(), raw.labels.copy(), raw.last_of_case


def _read_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("segcal-read")]


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("workers,ahead", [(2, 0), (2, 2), (3, 1), (1, 2)])
def test_pool_delivers_what_a_serial_read_does_in_order(tmp_path, workers, ahead):
    ds = open_dataset([str(_files(tmp_path))], DataOptions(chunk_voxels=100))
    serial = [_summary(r) for r in ds.iter_raw()]
    pooled = list(ds.iter_raw(workers=workers, ahead=ahead, then=_summary))
    assert len(serial) == len(pooled) > 4 * len(ds.cases)
    for a, b in zip(serial, pooled):
        assert a[0] == b[0] and a[1] == b[1] and a[4] == b[4]
        np.testing.assert_array_equal(a[2], b[2])
        np.testing.assert_array_equal(a[3], b[3])
    assert not _read_threads()


def test_the_first_error_in_order_is_raised_and_the_pool_stops(tmp_path):
    ds = open_dataset([str(_files(tmp_path))], DataOptions(chunk_voxels=100))
    order = [(r.case_index, r.unit.region) for r in ds.iter_raw()]
    before = _open_fds()

    def then(raw):
        position = order.index((raw.case_index, raw.unit.region))
        if position in (5, 6, 9):
            raise ValueError(f"unit {position}")
        return position

    got = []
    with pytest.raises(ValueError, match="unit 5"):
        for position in ds.iter_raw(workers=2, ahead=3, then=then):
            got.append(position)
    assert got == [0, 1, 2, 3, 4]
    assert not _read_threads()
    assert _open_fds() == before  # every container closed


def test_closing_early_waits_for_the_reads_and_closes_containers(tmp_path):
    ds = open_dataset([str(_files(tmp_path))], DataOptions(chunk_voxels=100))
    before = _open_fds()
    units = ds.iter_raw(workers=2, ahead=2)
    next(units)
    next(units)
    assert _read_threads()
    units.close()
    assert not _read_threads()
    assert _open_fds() == before


def test_a_corrupt_chunk_is_an_input_error_naming_the_case(tmp_path):
    path = write_h5(tmp_path / "x.h5", {"logits": RNG.normal(size=(C, 64, 64)).astype(np.float32)},
                    {"logits": (C, 16, 16)}, compression="gzip")
    with h5py.File(path, "r") as f:
        info = f["logits"].id.get_chunk_info(5)
    with open(path, "r+b") as fh:  # scramble one compressed chunk
        fh.seek(info.byte_offset)
        fh.write(b"\xff" * info.size)
    ds = open_dataset([str(path)], DataOptions(chunk_voxels=256))
    with pytest.raises(InputError, match="corrupt") as caught:
        list(ds.iter_raw(workers=2, ahead=2))
    assert "x.h5" in str(caught.value)
    assert not _read_threads()


@pytest.mark.parametrize("workers", [1, 3])
def test_the_stream_does_not_depend_on_the_number_of_readers(tmp_path, monkeypatch, workers):
    ds = open_dataset([str(_files(tmp_path))], DataOptions(chunk_voxels=100, device="cpu"))
    reference = [(b.case_index, b.region, b.logits.clone(), b.labels.clone(), b.valid.clone()) for b in ds.stream()]
    monkeypatch.setattr(engine, "READ_WORKERS", workers)
    again = [(b.case_index, b.region, b.logits, b.labels, b.valid) for b in ds.stream()]
    assert len(again) == len(reference)
    for a, b in zip(reference, again):
        assert a[:2] == b[:2]
        for x, y in zip(a[2:], b[2:]):
            assert torch.equal(x, y)
