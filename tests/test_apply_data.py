"""Shared helpers for the `segcal apply` tests: small containers on disk and an in-memory reference.

No tests here; the test_apply*.py files import it (the tests directory is put on sys.path by them).
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import torch
import zarr


def write_h5(path: Path, arrays: dict, chunks: dict | None = None, compression: str | None = "gzip") -> Path:
    """arrays: {'key' or 'group/key': ndarray}; chunks: {'key': tuple or None (contiguous)}."""
    chunks = chunks or {}
    with h5py.File(path, "w") as f:
        for key, value in arrays.items():
            ck = chunks.get(key, True)
            kwargs = {"compression": compression} if (compression and ck is not None) else {}
            f.create_dataset(key, data=value, chunks=ck, **kwargs)
    return Path(path)


def write_zarr(path: Path, arrays: dict, chunks: dict | None = None, shards: dict | None = None,
               dimension_names: dict | None = None, zarr_format: int = 3) -> Path:
    chunks, shards, dimension_names = chunks or {}, shards or {}, dimension_names or {}
    store = zarr.storage.ZipStore(str(path), mode="w") if str(path).endswith(".zip") else str(path)
    root = zarr.open_group(store, mode="w", zarr_format=zarr_format)
    for key, value in arrays.items():
        kwargs = {}
        if zarr_format == 3 and key in dimension_names:
            kwargs["dimension_names"] = dimension_names[key]
        if key in shards:
            kwargs["shards"] = shards[key]
        arr = root.create_array(key, shape=value.shape, dtype=value.dtype, chunks=chunks.get(key, value.shape),
                                **kwargs)
        arr[...] = value
    if not isinstance(store, str):
        store.close()
    return Path(path)


def open_group(path: Path):
    """Read-only handle on an output container (h5py.File or zarr group); close with close_group."""
    path = Path(path)
    if path.name.endswith((".h5", ".hdf5")):
        return h5py.File(path, "r")
    if path.name.endswith(".zip"):
        return zarr.open_group(store=zarr.storage.ZipStore(str(path), mode="r"), mode="r")
    return zarr.open_group(str(path), mode="r")


def read(path: Path, key: str) -> np.ndarray:
    group = open_group(path)
    try:
        return np.asarray(group[key][...])
    finally:
        if hasattr(group, "close"):
            group.close()


def reference(cal, logits: np.ndarray, class_axis: int, kind: str) -> np.ndarray:
    """The calibrator's forward pass on a whole case in memory, in the stored axis order (float32)."""
    z = torch.from_numpy(np.moveaxis(logits.astype(np.float32), class_axis, 0).copy())
    shape = z.shape
    binary = shape[0] == 1
    if binary:
        z = torch.cat([torch.zeros_like(z), z], 0)
    flat = z.reshape(z.shape[0], -1)
    out = cal.forward(flat) if cal is not None else flat
    if kind == "probabilities":
        out = torch.softmax(out, 0)
        out = out[1:2] if binary else out
    elif binary:
        out = out[1:2] - out[0:1]
    return np.moveaxis(out.reshape(out.shape[0], *shape[1:]).numpy(), 0, class_axis)


def assert_matches(written: np.ndarray, expected: np.ndarray, dtype: str, kind: str) -> None:
    """Equal to float32 rounding (float32), or to float16 rounding of the float32 result (float16)."""
    assert written.shape == expected.shape
    assert written.dtype == np.dtype(dtype)
    if dtype == "float16":
        # one float16 rounding of a value known to float32 precision: half an ulp plus float32 noise
        np.testing.assert_allclose(written.astype(np.float32), expected, rtol=2.0 ** -11 + 1e-5, atol=3e-8)
    elif kind == "probabilities":
        np.testing.assert_allclose(written, expected, rtol=1e-5, atol=1e-7)
    else:
        np.testing.assert_allclose(written, expected, rtol=1e-5, atol=1e-5)


def file_digest(path: Path) -> dict:
    """Bytes of every file under path (a file or a directory), to prove inputs are untouched."""
    import hashlib

    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}
