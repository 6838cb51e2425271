"""Finding data files and opening HDF5 / Zarr containers read-only behind one small interface.

A `Container` answers three questions: which arrays and groups it holds, what an array looks like
(shape, dtype, storage chunks, dimension names), and hands back the array object itself for slicing. h5py
datasets and zarr arrays both support `array[tuple_of_slices]`, so nothing above this module needs to know
which library is underneath.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from segcal_cli.errors import InputError
from segcal_cli.io.files import close_quietly

HDF5_SUFFIXES = (".h5", ".hdf5")
ZARR_ZIP_SUFFIXES = (".zarr.zip", ".zip")
SUPPORTED = "HDF5 (.h5, .hdf5), Zarr (.zarr directory, .zip, .zarr.zip)"

# HDF5 chunk cache per open file. h5py's default (1 MiB; 8 MiB on some builds) never holds a chunk larger
# than itself, so every partial read of a big chunk would decode it again (engineering.md). 64 MiB holds a
# row of typical chunks; only one container is open at a time per stream, so this bounds memory too.
HDF5_CACHE_BYTES = 64 << 20
HDF5_CACHE_SLOTS = 10007


def _register_hdf5_filters() -> None:
    """Make Blosc / Zstd / LZ4 / Bitshuffle-compressed HDF5 readable: importing hdf5plugin registers them."""
    try:
        import hdf5plugin  # noqa: F401
    except ImportError:  # reading gzip / lzf / szip needs nothing more
        pass


def container_kind(path: Path) -> str | None:
    """'hdf5', 'zarr', 'zarr-zip' or None (unsupported), from the name and, for directories, the content."""
    name = path.name.lower()
    if path.is_dir():
        if name.endswith(".zarr") or (path / "zarr.json").exists() or (path / ".zgroup").exists():
            return "zarr"
        return None
    if name.endswith(HDF5_SUFFIXES):
        return "hdf5"
    if name.endswith(ZARR_ZIP_SUFFIXES):
        return "zarr-zip"
    return None


def container_stem(path: Path) -> str:
    """The case-id stem of a container: its name without the (double) suffix."""
    name = path.name
    for suffix in (".zarr.zip", ".hdf5", ".h5", ".zarr", ".zip"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def discover(paths: list[str]) -> list[Path]:
    """Expand DATA arguments (files, Zarr stores, directories, quoted globs) into container paths.

    Order is deterministic: arguments in the order given; within a directory or glob, sorted by name.
    The same container named twice is read once.
    """
    if not paths:
        raise InputError("no DATA given: name HDF5 files, Zarr stores, directories or quoted globs")
    found: list[Path] = []
    for raw in paths:
        if any(ch in raw for ch in "*?["):
            matches = sorted(glob.glob(raw))
            if not matches:
                raise InputError(f"{raw}: the pattern matches no file")
            for match in matches:
                path = Path(match)
                if container_kind(path) is None:
                    continue
                found.append(path)
            continue
        path = Path(raw)
        if not path.exists():
            raise InputError(f"{raw}: no such file or directory")
        kind = container_kind(path)
        if kind is not None:
            found.append(path)
            continue
        if path.is_dir():
            members = [p for p in sorted(path.iterdir()) if container_kind(p) is not None]
            if not members:
                raise InputError(f"{raw}: the directory holds no supported file ({SUPPORTED})")
            found.extend(members)
            continue
        raise InputError(f"{raw}: unsupported file type; segcal reads {SUPPORTED}")
    unique: list[Path] = []
    seen: set[str] = set()
    for path in found:
        key = os.path.realpath(path)
        if key not in seen:
            seen.add(key)
            unique.append(path)
    if not unique:
        raise InputError(f"{' '.join(paths)}: no supported file found ({SUPPORTED})")
    return unique


@dataclass(frozen=True)
class ArrayInfo:
    """What the planner needs to know about a stored array, without reading it."""

    shape: tuple[int, ...]
    dtype: np.dtype
    chunks: tuple[int, ...] | None  # storage read unit (HDF5 chunk, zarr chunk or shard); None = contiguous
    dimension_names: tuple[str, ...] | None


class Container:
    """A read-only HDF5 file or Zarr store. Use as a context manager or call close()."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.kind = container_kind(self.path)
        self._handle: Any = None
        self._store: Any = None
        self._fd: int | None = None  # for direct HDF5 chunk reads (hdf5_direct.py), opened on first use
        self._direct_readers: dict = {}
        try:
            if self.kind == "hdf5":
                import h5py

                _register_hdf5_filters()
                self._handle = h5py.File(
                    self.path, "r", rdcc_nbytes=HDF5_CACHE_BYTES, rdcc_nslots=HDF5_CACHE_SLOTS
                )
            elif self.kind == "zarr":
                import zarr

                self._handle = zarr.open_group(str(self.path), mode="r")
            elif self.kind == "zarr-zip":
                import zarr
                from zarr.storage import ZipStore

                self._store = ZipStore(str(self.path), mode="r")
                self._handle = zarr.open_group(store=self._store, mode="r")
            else:
                raise InputError(f"unsupported file type; segcal reads {SUPPORTED}", source=str(self.path))
        except InputError:
            raise
        except Exception as err:  # h5py / zarr raise many types for unreadable containers
            self.close()
            detail = str(err).split("\n")[0] or type(err).__name__
            raise InputError(f"cannot open as {self.kind}: corrupt or not a {self.kind} container ({detail})",
                             source=str(self.path)) from None

    # -- structure -------------------------------------------------------------------------------
    def get_array(self, key: str):
        """The array at `key` (a path like 'logits' or 'case_1/logits'), or None if absent."""
        try:
            if self.kind == "hdf5":
                import h5py

                obj = self._handle.get(key)
                return obj if isinstance(obj, h5py.Dataset) else None
            import zarr

            try:
                obj = self._handle[key]
            except (KeyError, FileNotFoundError):
                return None
            return obj if isinstance(obj, zarr.Array) else None
        except InputError:
            raise
        except Exception as err:
            raise InputError(f"cannot read {key!r}: {str(err).splitlines()[0] if str(err) else type(err).__name__}",
                             source=str(self.path)) from None

    def groups_with(self, key: str) -> list[str]:
        """Paths of all groups (at any depth, sorted) that hold an array named `key`."""
        found: list[str] = []

        def walk(group, prefix: str) -> None:
            for name in sorted(self._group_names(group)):
                sub = group[name]
                path = f"{prefix}{name}"
                if self._is_group(sub):
                    if self._is_array(self._child(sub, key)):
                        found.append(path)
                    walk(sub, path + "/")

        try:
            walk(self._handle, "")
        except InputError:
            raise
        except Exception as err:
            raise InputError(f"cannot list groups: {str(err).splitlines()[0] if str(err) else type(err).__name__}",
                             source=str(self.path)) from None
        return found

    def _group_names(self, group) -> list[str]:
        if self.kind == "hdf5":
            return list(group.keys())
        return [name for name, _ in group.members()]

    def _is_group(self, obj) -> bool:
        if self.kind == "hdf5":
            import h5py

            return isinstance(obj, h5py.Group)
        import zarr

        return isinstance(obj, zarr.Group)

    def _is_array(self, obj) -> bool:
        if obj is None:
            return False
        if self.kind == "hdf5":
            import h5py

            return isinstance(obj, h5py.Dataset)
        import zarr

        return isinstance(obj, zarr.Array)

    def _child(self, group, key):
        try:
            return group[key] if key in group else None
        except Exception:
            return None

    @staticmethod
    def info(array) -> ArrayInfo:
        shape = tuple(int(s) for s in array.shape)
        dtype = np.dtype(array.dtype)
        names = None
        chunks = None
        if hasattr(array, "id") and hasattr(array, "chunks") and hasattr(array, "file"):  # h5py.Dataset
            chunks = tuple(int(c) for c in array.chunks) if array.chunks is not None else None
            dims = array.attrs.get("dimension_names")
            if dims is not None:
                names = tuple(str(d) for d in np.asarray(dims).tolist())
        else:  # zarr.Array: whole shards are the cheapest aligned read unit (engineering.md, zarr #2971)
            shards = getattr(array, "shards", None)
            chunks = tuple(int(c) for c in (shards or array.chunks))
            dims = getattr(getattr(array, "metadata", None), "dimension_names", None)
            if dims is None:
                dims = array.attrs.get("dimension_names") if hasattr(array, "attrs") else None
            if dims is not None and all(d is not None for d in dims):
                names = tuple(str(d) for d in dims)
        return ArrayInfo(shape=shape, dtype=dtype, chunks=chunks, dimension_names=names)

    def reader(self, array) -> Callable[[tuple], np.ndarray]:
        """A function index -> numpy array as stored. Unfiltered chunked HDF5 is read by direct chunk reads
        that release the GIL (hdf5_direct.py); everything else through h5py / zarr."""
        if self.kind == "hdf5":
            from segcal_cli.io.hdf5_direct import DirectChunkReader

            if DirectChunkReader.eligible(array):
                if self._fd is None:
                    self._fd = os.open(self.path, os.O_RDONLY)
                # one reader per dataset: it keeps the dataset's chunk index, which every case of a batched
                # array shares
                if array.name not in self._direct_readers:
                    self._direct_readers[array.name] = DirectChunkReader(array, self._fd)
                return self._direct_readers[array.name].read
        return lambda index: np.asarray(array[index])

    def close(self) -> None:
        self._direct_readers = {}
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        close_quietly(self._handle if self.kind == "hdf5" else None, self._store)
        self._handle = None
        self._store = None

    def __enter__(self) -> "Container":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def iter_containers(paths: list[Path]) -> Iterator[Container]:
    for path in paths:
        with Container(path) as container:
            yield container
