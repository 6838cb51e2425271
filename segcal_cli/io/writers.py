"""Output containers for `segcal apply`: mirror the input layout, write behind, appear whole or not at all.

Three pieces, used in this order by `segcal_cli.applying.apply_calibrator` (the driver, one layer up: this
module knows containers, not calibrators or the streaming engine):

* `check_destination`: what `OUT` may be (a supported suffix, a writable directory, not an input, not
  inside an input, not holding an input, absent unless `--overwrite`). Runs before anything is written.
* `AtomicOutput`: the container is built under `.<OUT>.segcal-tmp-<host>-<pid>` in OUT's directory and
  renamed into place by `commit()`; `abort()` removes it. A SIGKILLed run leaves that temporary name (never
  `OUT`); the next run on the same host removes temporaries whose process is gone.
* `WriteBehind`: one writer thread with a bounded queue, so compression and writing overlap compute (h5py
  serialises every call behind one lock, so more writer threads would only queue on it).

Layout (docs/apply.md): one input container -> its structure at the output root; several -> one group per
input file stem (`-2`, `-3`, ... when stems repeat), the input structure inside it. Each case's result is
`probabilities` (or `logits`) next to copies of its labels and mask under their own names, with the input's
shape, class axis and chunk grid (batch axis chunked by 1, so cases never share a chunk). A one-channel
(binary sigmoid) input gives one channel out: p(class 1), or the calibrated logit difference z1 - z0, which
segcal reads back as the same two classes.
"""

from __future__ import annotations

import hashlib
import os
import queue
import re
import shutil
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from segcal_cli.errors import InputError
from segcal_cli.io.containers import container_stem
from segcal_cli.io.files import close_quietly

OUTPUT_KINDS = ("probabilities", "logits")
OUTPUT_DTYPES = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16)}
OUTPUT_SUFFIXES = "HDF5 (.h5, .hdf5), Zarr directory (.zarr), Zarr zip (.zip, .zarr.zip)"

# HDF5 filter ids (H5Zpublic.h and the registered plugin ids).
_H5Z_DEFLATE, _H5Z_SHUFFLE, _H5Z_FLETCHER32 = 1, 2, 3
_H5Z_LZF = 32000
_BLOSC_IDS = (32001, 32026)  # Blosc, Blosc2: their first four cd_values are filled in per dataset
_TMP_TAG = ".segcal-tmp-"
_OLD_TAG = ".segcal-old-"


def _try_hdf5plugin() -> bool:
    """Register the Blosc/Zstd/LZ4 HDF5 filters when hdf5plugin is installed (optional dependency)."""
    try:
        import hdf5plugin  # noqa: F401  (importing registers the filters with HDF5)

        return True
    except Exception:
        return False


# --------------------------------------------------------------------------------------------- destination
def output_format(path: Path) -> str:
    """'hdf5', 'zarr' or 'zarr-zip' from OUT's name; InputError for anything else."""
    name = path.name.lower()
    if name.endswith((".h5", ".hdf5")):
        return "hdf5"
    if name.endswith((".zarr.zip", ".zip")):
        return "zarr-zip"
    if name.endswith(".zarr"):
        return "zarr"
    raise InputError(f"unsupported output type; segcal apply writes {OUTPUT_SUFFIXES}", source=str(path))


def _inside(child: str, parent: str) -> bool:
    return child == parent or child.startswith(parent.rstrip(os.sep) + os.sep)


def check_destination(out: Path, inputs: list[Path], protected: list[Path], overwrite: bool) -> str:
    """Validate OUT before anything is written; returns its format. InputError names what is wrong."""
    fmt = output_format(out)
    real_out = os.path.realpath(out)
    for path in list(inputs) + list(protected):
        real_in = os.path.realpath(path)
        same = _inside(real_in, real_out) or _inside(real_out, real_in)
        if not same and out.exists() and path.exists():
            try:
                same = os.path.samefile(out, path)  # hard links
            except OSError:
                pass
        if same:
            raise InputError(f"the output would overwrite or sit inside the input {str(path)!r}; choose another -o",
                             source=str(out))
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise InputError("the output already exists (pass --overwrite to replace it)", source=str(out))
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.exists():
        raise InputError(f"cannot write the output: directory {str(parent)!r} does not exist", source=str(out))
    if not parent.is_dir():
        raise InputError(f"cannot write the output: {str(parent)!r} is not a directory", source=str(out))
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"cannot write the output: directory {str(parent)!r} is not writable", source=str(out))
    return fmt


# --------------------------------------------------------------------------------------------- atomic output
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def remove_stale_temporaries(out: Path) -> list[Path]:
    """Remove leftovers of killed runs on this host (their pid is gone); returns what was removed."""
    parent = out.parent if str(out.parent) else Path(".")
    host = re.escape(socket.gethostname())
    pattern = re.compile(rf"^\.{re.escape(out.name)}(?:{re.escape(_TMP_TAG)}|{re.escape(_OLD_TAG)}){host}-(\d+)$")
    removed = []
    try:
        entries = list(parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = pattern.match(entry.name)
        if match and int(match.group(1)) != os.getpid() and not _pid_alive(int(match.group(1))):
            _remove(entry)
            removed.append(entry)
    return removed


class AtomicOutput:
    """An HDF5 file or Zarr store built under a temporary name next to OUT, renamed into place on commit."""

    def __init__(self, out: Path, fmt: str, overwrite: bool, root_attributes: dict):
        self.out = Path(out)
        self.fmt = fmt
        self.overwrite = overwrite
        parent = self.out.parent if str(self.out.parent) else Path(".")
        tag = f"{socket.gethostname()}-{os.getpid()}"
        self.tmp = parent / f".{self.out.name}{_TMP_TAG}{tag}"
        self._old = parent / f".{self.out.name}{_OLD_TAG}{tag}"
        self.root: Any = None
        self._store: Any = None
        self._groups: dict[str, Any] = {}
        self._fd: Optional[int] = None  # for direct chunk writes into the HDF5 temporary (hdf5_direct.py)
        remove_stale_temporaries(self.out)
        _remove(self.tmp)
        try:
            if fmt == "hdf5":
                import h5py

                self.root = h5py.File(self.tmp, "w")
                for key, value in _hdf5_attrs(root_attributes).items():
                    self.root.attrs[key] = value
            else:
                import zarr

                if fmt == "zarr":
                    self.root = zarr.open_group(str(self.tmp), mode="w", zarr_format=3, attributes=root_attributes)
                else:
                    from zarr.storage import ZipStore

                    self._store = ZipStore(str(self.tmp), mode="w")
                    self.root = zarr.open_group(store=self._store, mode="w", zarr_format=3,
                                                attributes=root_attributes)
        except OSError as err:
            self.abort()
            raise InputError(f"cannot write the output: {err.strerror or err}", source=str(self.out)) from None
        self._groups[""] = self.root

    def group(self, path: str):
        """The group at `path` ('' = root), created once (a zip entry must never be written twice)."""
        path = path.strip("/")
        if path in self._groups:
            return self._groups[path]
        head, _, name = path.rpartition("/")
        parent = self.group(head)
        grp = parent.create_group(name)
        self._groups[path] = grp
        return grp

    def direct_writer(self, dataset):
        """A DirectChunkWriter for an unfiltered, early-allocated dataset of this HDF5 output (else the
        dataset itself, written through h5py)."""
        from segcal_cli.io.hdf5_direct import DirectChunkWriter

        if not DirectChunkWriter.eligible(dataset):
            return dataset
        if self._fd is None:
            self._fd = os.open(self.tmp, os.O_WRONLY)
        return DirectChunkWriter(dataset, self._fd)

    def _close_handles(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        close_quietly(self.root if self.fmt == "hdf5" else None, self._store)
        self.root = None
        self._store = None
        self._groups = {}

    def commit(self) -> None:
        """Close and rename into place. An existing OUT (only with --overwrite) is moved away first."""
        if self.fmt == "hdf5":
            self.root.flush()
        self._close_handles()
        exists = self.out.exists() or self.out.is_symlink()
        if exists and not self.overwrite:
            raise InputError("the output appeared while writing; not replacing it (pass --overwrite)",
                             source=str(self.out))
        if exists and (self.out.is_dir() or self.tmp.is_dir()) and not self.out.is_symlink():
            os.replace(self.out, self._old)  # a directory cannot be replaced in one rename
            os.replace(self.tmp, self.out)
            _remove(self._old)
        else:
            os.replace(self.tmp, self.out)

    def abort(self) -> None:
        self._close_handles()
        _remove(self.tmp)


# --------------------------------------------------------------------------------------------- write behind
_DONE = object()


class WriteBehind:
    """One writer thread fed through a bounded queue; its errors surface in the submitting thread."""

    def __init__(self, depth: int = 3):
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._error: Optional[BaseException] = None
        self._stop = threading.Event()
        self.busy_seconds = 0.0
        self._thread = threading.Thread(target=self._run, name="segcal-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _DONE:
                return
            if self._error is not None or self._stop.is_set():
                continue  # drain without writing after an error or an abort
            func, args = item
            start = time.perf_counter()
            try:
                func(*args)
            except BaseException as err:  # handed to the submitting thread
                self._error = err
            self.busy_seconds += time.perf_counter() - start

    def _raise(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            self._stop.set()
            raise err

    def submit(self, func: Callable, *args) -> None:
        self._raise()
        while True:
            try:
                self._queue.put((func, args), timeout=0.1)
                return
            except queue.Full:
                self._raise()

    def finish(self) -> None:
        """Wait until every submitted write is done; re-raise a writer error."""
        self._queue.put(_DONE)
        self._thread.join()
        self._raise()

    def abort(self) -> None:
        """Drop queued writes, wait for the one in progress, stop the thread."""
        self._stop.set()
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        try:
            self._queue.put(_DONE, timeout=5)
        except queue.Full:
            pass
        self._thread.join(timeout=60)


# --------------------------------------------------------------------------------------------- storage settings
@dataclass
class Storage:
    """How one output array is stored: chunk grid (+ shards for Zarr) and compression."""

    chunks: Optional[tuple[int, ...]]  # None = contiguous (HDF5 only)
    shards: Optional[tuple[int, ...]] = None
    hdf5: dict = field(default_factory=dict)  # create_dataset keyword arguments (compression, shuffle, ...)
    zarr_compressors: Optional[list] = None  # None = the fast default


def _fast_hdf5() -> dict:
    """Blosc-LZ4 with byte shuffle when hdf5plugin is there (fast, 1.4-1.6x on float16), else LZF + shuffle."""
    if _try_hdf5plugin():
        import hdf5plugin

        return dict(hdf5plugin.Blosc(cname="lz4", clevel=5, shuffle=hdf5plugin.Blosc.SHUFFLE))
    return {"compression": "lzf", "shuffle": True}


def _fast_zarr() -> list:
    from zarr.codecs import BloscCodec

    return [BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")]


def hdf5_filters(dataset) -> Optional[dict]:
    """create_dataset keywords reproducing an HDF5 dataset's filter pipeline; None if not reproducible here."""
    import h5py

    _try_hdf5plugin()
    dcpl = dataset.id.get_create_plist()
    kwargs: dict = {}
    for i in range(dcpl.get_nfilters()):
        code, _flags, values, _name = dcpl.get_filter(i)
        values = tuple(int(v) for v in values)
        if code == _H5Z_SHUFFLE:
            kwargs["shuffle"] = True
        elif code == _H5Z_FLETCHER32:
            kwargs["fletcher32"] = True
        elif "compression" in kwargs:
            return None  # two compressors in a row: h5py's high-level API cannot express it
        elif code == _H5Z_DEFLATE:
            kwargs.update(compression="gzip", compression_opts=values[0] if values else 4)
        elif code == _H5Z_LZF:
            kwargs["compression"] = "lzf"
        elif code > 255 and h5py.h5z.filter_avail(code):
            if code in _BLOSC_IDS:
                values = (0, 0, 0, 0) + values[4:]  # typesize and sizes are recomputed for the new dtype
            kwargs.update(compression=code, compression_opts=values)
        else:
            return None  # szip (encoder often absent), scale-offset (lossy, dtype-bound), missing plugins
    return kwargs


def zarr_compressors(array) -> Optional[list]:
    """Zarr v3 bytes-to-bytes codecs equivalent to an input array's compressors; None if not mappable."""
    from zarr.codecs import BloscCodec, GzipCodec, ZstdCodec

    out = []
    for codec in getattr(array, "compressors", ()) or ():
        if isinstance(codec, BloscCodec):
            # typesize left open: the codec takes it from the output dtype (float16 != float32)
            out.append(BloscCodec(cname=codec.cname, clevel=codec.clevel, shuffle=codec.shuffle))
        elif isinstance(codec, (ZstdCodec, GzipCodec)):
            out.append(codec)
        else:
            cid = getattr(codec, "codec_id", None)  # numcodecs codecs of a Zarr v2 array
            if cid == "blosc":
                shuffle = {0: "noshuffle", 1: "shuffle", 2: "bitshuffle"}.get(int(codec.shuffle), "shuffle")
                out.append(BloscCodec(cname=codec.cname, clevel=codec.clevel, shuffle=shuffle))
            elif cid == "zstd":
                out.append(ZstdCodec(level=codec.level))
            elif cid in ("gzip", "zlib"):
                out.append(GzipCodec(level=codec.level))
            else:
                return None
    return out


def _is_hdf5(array) -> bool:
    return hasattr(array, "id") and hasattr(array, "file")


def storage_like(array, out_format: str, batched: bool, unit_chunks: tuple[int, ...]) -> Storage:
    """Output storage mirroring an input array: same chunk grid, same compression where reproducible.

    `unit_chunks` is the grid to use when the input has none (contiguous HDF5): the read units the engine
    plans, so every write covers whole output chunks.
    """
    if _is_hdf5(array):
        chunks = tuple(int(c) for c in array.chunks) if array.chunks is not None else None
        shards = None
    else:
        chunks = tuple(int(c) for c in array.chunks)
        shards = tuple(int(c) for c in array.shards) if getattr(array, "shards", None) else None
    if batched:  # cases never share a chunk: each case's writes stay whole-chunk
        chunks = (1, *chunks[1:]) if chunks is not None else None
        shards = (1, *shards[1:]) if shards is not None else None
    if out_format == "hdf5":
        if _is_hdf5(array):
            if chunks is None:  # contiguous in, contiguous out: HDF5 cannot compress it
                return Storage(chunks=None)
            filters = hdf5_filters(array)
            return Storage(chunks=chunks, hdf5=filters if filters is not None else _fast_hdf5())
        return Storage(chunks=chunks, hdf5=_fast_hdf5())  # zarr inner chunks: shards are whole multiples
    if chunks is None:
        chunks = unit_chunks
    compressors = zarr_compressors(array) if not _is_hdf5(array) else None
    return Storage(chunks=chunks, shards=shards,
                   zarr_compressors=compressors if compressors is not None else _fast_zarr())


def default_dimension_names(ndim_spatial: int) -> tuple[str, ...]:
    if ndim_spatial <= 3:
        return ("z", "y", "x")[3 - ndim_spatial:]
    return tuple(f"d{i}" for i in range(ndim_spatial))


def _hdf5_attrs(attrs: dict) -> dict:
    """HDF5 attributes cannot hold None or nested mappings: drop None, keep scalars, strings and lists."""
    out = {}
    for key, value in attrs.items():
        if value is None or isinstance(value, dict):
            continue
        out[key] = list(value) if isinstance(value, tuple) else value
    return out


def create_array(output: AtomicOutput, key: str, shape: tuple[int, ...], dtype: np.dtype, storage: Storage,
                 dimension_names: tuple[str, ...], attributes: dict):
    """Create one output array with its storage, dimension names and attributes (all set at creation)."""
    group_path, _, name = key.rpartition("/")
    group = output.group(group_path)
    if output.fmt == "hdf5":
        kwargs = dict(storage.hdf5) if storage.chunks is not None else {}
        direct = storage.chunks is not None and not kwargs  # unfiltered chunks: written by pwritev
        if direct:
            from segcal_cli.io.hdf5_direct import early_allocation

            kwargs["dcpl"] = early_allocation()
        dset = group.create_dataset(name, shape=shape, dtype=dtype, chunks=storage.chunks, **kwargs)
        for akey, value in _hdf5_attrs({**attributes, "dimension_names": list(dimension_names)}).items():
            dset.attrs[akey] = value
        return output.direct_writer(dset) if direct else dset
    return group.create_array(
        name, shape=shape, dtype=dtype, chunks=storage.chunks, shards=storage.shards,
        compressors=storage.zarr_compressors, fill_value=0, dimension_names=list(dimension_names),
        attributes=attributes,
    )


def _write(array, index, data) -> None:
    """One whole-chunk write: an h5py / zarr array, or a DirectChunkWriter (same `[index] = data`)."""
    array[index] = data


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for piece in iter(lambda: fh.read(1 << 20), b""):
            digest.update(piece)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------- layout
@dataclass
class OutputArray:
    """One output array for the logits array of one input (shared by the cases of a batched array)."""

    source: str
    input_key: str
    output_key: str
    cases: list[int]
    batched: bool


def _output_prefixes(sources: list[str]) -> dict[str, str]:
    """Group prefix per input container: '' for one input; the (de-duplicated) file stem for several."""
    if len(sources) == 1:
        return {sources[0]: ""}
    prefixes: dict[str, str] = {}
    used: set[str] = set()
    for source in sources:
        stem = container_stem(Path(source))
        name, k = stem, 1
        while name in used:
            k += 1
            name = f"{stem}-{k}"
        used.add(name)
        prefixes[source] = name + "/"
    return prefixes


def _relative(key: str, group: Optional[str]) -> str:
    """A key inside a case's group, without the group prefix."""
    if group and key.startswith(group + "/"):
        return key[len(group) + 1:]
    return key


def plan_outputs(cases, kind: str) -> tuple[list[OutputArray], dict[int, str]]:
    """Output arrays in case order, and each case's output group path (for labels and mask)."""
    sources = list(dict.fromkeys(c.source for c in cases))
    prefixes = _output_prefixes(sources)
    arrays: dict[tuple[str, str], OutputArray] = {}
    groups: dict[int, str] = {}
    for index, case in enumerate(cases):
        group = prefixes[case.source] + (case.group + "/" if case.group else "")
        groups[index] = group
        key = (case.source, case.logits_key)
        if key not in arrays:
            arrays[key] = OutputArray(case.source, case.logits_key, group + kind, [], case.batch_index is not None)
        arrays[key].cases.append(index)
    return list(arrays.values()), groups
