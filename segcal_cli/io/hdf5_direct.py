"""Direct chunk reads of unfiltered, chunked HDF5 datasets: `os.preadv` straight into the destination array.

Why. h5py holds the GIL for the whole of a read, so a reader thread and the converter thread of the engine
could not overlap on two cores; and h5py's selection machinery costs more than moving the bytes. On the 2 GB
benchmark file (25 x 19 x 1024 x 2048 float16, chunks (1, 19, 256, 256)) a plain chunk-by-chunk h5py read took
0.63-0.74 s, the same chunks read with preadv 0.26 s (warm page cache, this project's 2-core machine;
`python benchmarks/bench_stream.py`). preadv releases the GIL.

HDF5 still owns the layout: the file address and size of each chunk come from HDF5 itself
(H5Dget_chunk_info). The bytes are used as they are only when they *are* the array's values: chunked layout,
no filter in the pipeline, a native-endian numeric dtype, the default (sec2) file driver, no user block; and,
per chunk, allocated and of exactly the chunk's size. Anything else, and any doubt on a read (a short read,
an unallocated chunk, a selection not on the chunk grid), goes through h5py unchanged.

Writes. `segcal apply` writes an unfiltered HDF5 output the same way: the output dataset is created with its
chunks allocated at creation (`early_allocation()`, no fill values written) so HDF5 knows every chunk's
address before the first write, and each whole chunk goes to that address with one pwritev, GIL released.

Zero copy. A read unit of the planner is a column of chunks along the first spatial axis (io/blocks.py), so a
whole chunk lands in the destination as a few contiguous runs (one per class when classes come first, one
when they come last) and preadv scatters it there in one call. Chunks that do not fit that way (edge chunks,
stored at full size; wider units) are read whole into a scratch buffer and the valid part is copied.
"""

from __future__ import annotations

import itertools
import math
import os
import threading

import numpy as np

# preadv takes at most IOV_MAX (1024 on Linux) buffers; a chunk needing more runs than this is read into a
# scratch buffer and copied instead.
MAX_RUNS = 512


class _Fallback(Exception):
    """This read cannot be done directly; h5py does it."""


def _eligible(dataset) -> bool:
    try:
        if dataset.chunks is None or dataset.is_virtual:
            return False
        if dataset.id.get_create_plist().get_nfilters() != 0:
            return False
        if dataset.external:
            return False
        dtype = np.dtype(dataset.dtype)
        if dtype.kind not in "fiub" or not dtype.isnative or dtype.itemsize == 0:
            return False
        f = dataset.file
        if f.driver != "sec2" or f.userblock_size != 0:
            return False
        return hasattr(dataset.id, "get_chunk_info_by_coord")
    except Exception:  # any doubt: h5py reads it
        return False


class _ChunkLayout:
    """The chunk grid of one dataset, and how a chunk-aligned selection maps onto it."""

    def __init__(self, dataset, fd: int):
        self._dataset = dataset
        self._shape = tuple(int(s) for s in dataset.shape)
        self._chunks = tuple(int(c) for c in dataset.chunks)
        self._dtype = np.dtype(dataset.dtype)
        self._chunk_bytes = math.prod(self._chunks) * self._dtype.itemsize
        self._fd = fd
        self._local = threading.local()  # readers run in several threads (Dataset.iter_raw); one scratch each
        self._run_cache: dict = {}

    def _box(self, index: tuple) -> tuple[list[tuple[int, int]], list[int]]:
        """(start, stop) per dimension and the dimensions an int index drops; _Fallback off the chunk grid."""
        if len(index) != len(self._shape):
            raise _Fallback
        box, dropped = [], []
        for dim, (idx, size, chunk) in enumerate(zip(index, self._shape, self._chunks)):
            if isinstance(idx, slice):
                start, stop, step = idx.indices(size)
                if step != 1 or stop <= start:
                    raise _Fallback
            elif isinstance(idx, (int, np.integer)):
                start = int(idx) + (size if idx < 0 else 0)
                stop = start + 1
                dropped.append(dim)
                if chunk != 1:  # one case of a chunk holding several: h5py's cache does better
                    raise _Fallback
            else:
                raise _Fallback
            if start % chunk or (stop % chunk and stop != size):
                raise _Fallback
            box.append((start, stop))
        return box, dropped

    def _chunk_address(self, corner: tuple[int, ...]) -> int:
        """The file offset of the chunk at `corner`; _Fallback when it is not stored whole and unfiltered."""
        info = self._dataset.id.get_chunk_info_by_coord(corner)
        if info.byte_offset is None or info.size != self._chunk_bytes or info.filter_mask:
            raise _Fallback  # unallocated (fill value) or unexpected: let HDF5 decide
        return info.byte_offset

    def _chunks_in(self, box, array_shape):
        """(file offset, valid extent, position in the box's array, contiguous runs or None) per chunk."""
        for corner in itertools.product(*[range(a, b, c) for (a, b), c in zip(box, self._chunks)]):
            offset = self._chunk_address(corner)
            valid = tuple(min(c, s - o) for c, s, o in zip(self._chunks, self._shape, corner))
            local = tuple(o - a for o, (a, _) in zip(corner, box))
            runs = self._runs(local, tuple(array_shape)) if valid == self._chunks else None
            yield offset, valid, local, runs

    def _runs(self, local: tuple[int, ...], out_shape: tuple[int, ...]) -> list[tuple[int, int]] | None:
        """The (flat start, length) runs a whole chunk at `local` occupies in C-order `out`, in the chunk's
        own byte order; None when there would be too many. Memoised: every read unit of a case repeats them."""
        key = (local, out_shape)
        runs = self._run_cache.get(key, False)
        if runs is False:
            if len(self._run_cache) > 4096:
                self._run_cache.clear()
            runs = self._run_cache[key] = self._compute_runs(self._chunks, local, out_shape)
        return runs

    @staticmethod
    def _compute_runs(chunk: tuple[int, ...], local: tuple[int, ...],
                      out_shape: tuple[int, ...]) -> list[tuple[int, int]] | None:
        strides = [math.prod(out_shape[d + 1:]) for d in range(len(out_shape))]
        # the trailing dimensions the chunk spans entirely are contiguous; `axis` is the last one it does not
        axis = len(chunk) - 1
        while axis >= 0 and chunk[axis] == out_shape[axis]:
            axis -= 1
        if axis < 0:
            return [(0, math.prod(chunk))]
        length = math.prod(chunk[axis:])
        outer = chunk[:axis]
        if math.prod(outer) > MAX_RUNS:
            return None
        base = sum(lo * st for lo, st in zip(local, strides))
        return [(base + sum(i * st for i, st in zip(position, strides)), length)
                for position in itertools.product(*(range(n) for n in outer))]

    def _scratch_chunk(self) -> np.ndarray:
        scratch = getattr(self._local, "scratch", None)
        if scratch is None:
            scratch = self._local.scratch = np.empty(self._chunks, dtype=self._dtype)
        return scratch


class DirectChunkReader(_ChunkLayout):
    """`read(index)` == `np.asarray(dataset[index])` for an index of ints and step-1 slices, faster.

    `fd` is a read-only descriptor of the dataset's file, owned by the caller (Container)."""

    # Up to this many chunks, the reader asks HDF5 for every chunk's address once (H5Dchunk_iter: 2 ms for the
    # 800 chunks of the benchmark's logits) instead of once per chunk per read (13 us each, GIL held). The
    # index costs ~250 bytes a chunk, so it stays below ~16 MB; datasets with more chunks are asked per chunk.
    INDEX_LIMIT = 1 << 16

    def __init__(self, dataset, fd: int):
        super().__init__(dataset, fd)
        self._index: dict | None = None
        self._index_lock = threading.Lock()

    @staticmethod
    def eligible(dataset) -> bool:
        return _eligible(dataset)

    def _chunk_address(self, corner: tuple[int, ...]) -> int:
        index = self._index if self._index is not None else self._build_index()
        if index is False:
            return super()._chunk_address(corner)
        stored = index.get(corner)
        if stored is None or stored[1] != self._chunk_bytes or stored[2]:
            raise _Fallback  # unallocated (fill value) or unexpected: let HDF5 decide
        return stored[0]

    def _build_index(self):
        with self._index_lock:
            if self._index is None:
                count = math.prod(-(-s // c) for s, c in zip(self._shape, self._chunks))
                index: dict | bool = False
                if count <= self.INDEX_LIMIT and hasattr(self._dataset.id, "chunk_iter"):
                    found: dict = {}
                    try:
                        self._dataset.id.chunk_iter(
                            lambda info: found.__setitem__(tuple(info.chunk_offset),
                                                           (info.byte_offset, info.size, info.filter_mask)))
                        index = found
                    except Exception:  # an HDF5 without H5Dchunk_iter: ask per chunk
                        index = False
                self._index = index
        return self._index

    def read(self, index: tuple) -> np.ndarray:
        try:
            return self._read(index)
        except _Fallback:
            return np.asarray(self._dataset[index])

    def _read(self, index: tuple) -> np.ndarray:
        box, dropped = self._box(index)
        out = np.empty(tuple(b - a for a, b in box), dtype=self._dtype)
        flat = out.reshape(-1)
        for offset, valid, local, runs in self._chunks_in(box, out.shape):
            if runs is not None:
                got = os.preadv(self._fd, [flat[start:start + length] for start, length in runs], offset)
            else:
                scratch = self._scratch_chunk()
                got = os.preadv(self._fd, [scratch.reshape(-1)], offset)
                out[tuple(slice(lo, lo + v) for lo, v in zip(local, valid))] = scratch[tuple(slice(0, v) for v in valid)]
            if got != self._chunk_bytes:
                raise _Fallback  # short read: a truncated or damaged file; h5py reports it properly
        return out.reshape(tuple(n for d, n in enumerate(out.shape) if d not in dropped))


class DirectChunkWriter(_ChunkLayout):
    """`writer[index] = data` is `dataset[index] = data` for whole chunks of an early-allocated dataset.

    `fd` is a writable descriptor of the dataset's file, owned by the caller (the output container)."""

    @staticmethod
    def eligible(dataset) -> bool:
        try:
            import h5py

            plist = dataset.id.get_create_plist()
            early = plist.get_alloc_time() == h5py.h5d.ALLOC_TIME_EARLY
        except Exception:
            return False
        return early and _eligible(dataset)

    def __setitem__(self, index: tuple, data: np.ndarray) -> None:
        try:
            self._write(index, data)
        except _Fallback:
            self._dataset[index] = data

    def _write(self, index: tuple, data: np.ndarray) -> None:
        box, _ = self._box(index)
        shape = tuple(b - a for a, b in box)
        if data.dtype != self._dtype or math.prod(data.shape) != math.prod(shape):
            raise _Fallback
        data = np.ascontiguousarray(data).reshape(shape)
        flat = data.reshape(-1)
        for offset, valid, local, runs in self._chunks_in(box, shape):
            if runs is not None:
                buffers = [flat[start:start + length] for start, length in runs]
            else:  # an edge chunk is stored whole: the part outside the array is written as zeros
                scratch = self._scratch_chunk()
                scratch[...] = 0
                scratch[tuple(slice(0, v) for v in valid)] = data[tuple(slice(lo, lo + v) for lo, v in zip(local, valid))]
                buffers = [scratch.reshape(-1)]
            written = os.pwritev(self._fd, buffers, offset)
            if written != self._chunk_bytes:
                raise OSError(f"short write: {written} of {self._chunk_bytes} bytes")


def early_allocation():
    """A dataset-creation property list that allocates every chunk at creation and writes no fill value, so
    `DirectChunkWriter` knows each chunk's address before writing (HDF5 keeps the chunk index)."""
    import h5py

    plist = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    plist.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    plist.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
    return plist
