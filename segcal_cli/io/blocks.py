"""Block planning: cut a case's spatial extent into reads aligned to its storage chunks.

A *read unit* is a hyper-rectangle of whole storage chunks (or one chunk, or for contiguous HDF5 a slab of
rows) read in one call, so every stored chunk is decoded exactly once. A unit is then cut into *blocks* of
at most `max_voxels` voxels, which are what consumers see. Memory is therefore bounded by
max(max_voxels, one storage chunk), never by the size of a case.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

Region = tuple[slice, ...]


@dataclass(frozen=True)
class ReadUnit:
    region: Region  # what is read from storage in one call
    blocks: tuple[Region, ...]  # sub-regions of `region` (absolute coordinates) handed to consumers


def region_shape(region: Region) -> tuple[int, ...]:
    return tuple(s.stop - s.start for s in region)


def region_size(region: Region) -> int:
    return math.prod(region_shape(region))


def _tile(extent: tuple[int, ...], step: tuple[int, ...], origin: tuple[int, ...]) -> list[Region]:
    ranges = [range(o, o + e, s) for o, e, s in zip(origin, extent, step)]
    return [
        tuple(slice(start, min(start + s, o + e)) for start, s, o, e in zip(starts, step, origin, extent))
        for starts in itertools.product(*ranges)
    ]


def _grow(unit: list[int], shape: tuple[int, ...], max_voxels: int, axes) -> list[int]:
    """Enlarge a unit by whole chunks along `axes` in that order, while it stays within max_voxels."""
    grown = list(unit)
    for axis in axes:
        others = math.prod(grown) // grown[axis]
        fit = max_voxels // others
        if fit >= shape[axis]:
            grown[axis] = shape[axis]
            continue
        grown[axis] = max(unit[axis], fit // unit[axis] * unit[axis])
        break
    return grown


def _grow_chunked(chunk: list[int], shape: tuple[int, ...], max_voxels: int) -> list[int]:
    """A column of chunks along the first spatial axis: every whole chunk then lands in the unit's array as
    a few contiguous runs (one per class when classes come first), which direct HDF5 reads scatter without a
    copy (hdf5_direct.py). Only a column that stays under a quarter of max_voxels (a short first axis) grows
    further, along the next axes, so that units do not get small."""
    column = _grow(chunk, shape, max_voxels, [0])
    if math.prod(column) * 4 > max_voxels or len(shape) == 1:
        return column
    return _grow(column, shape, max_voxels, range(1, len(shape)))


def _split(unit: tuple[int, ...], max_voxels: int) -> tuple[int, ...]:
    """A block shape that cuts a too-large unit into pieces of at most max_voxels (first axes first)."""
    piece = list(unit)
    for axis in range(len(unit)):
        if math.prod(piece) <= max_voxels:
            break
        others = math.prod(piece) // piece[axis]
        piece[axis] = max(1, min(piece[axis], max_voxels // others))
    return tuple(piece)


def plan(spatial_shape: tuple[int, ...], spatial_chunks: tuple[int, ...] | None, max_voxels: int) -> list[ReadUnit]:
    """Read units covering every voxel of `spatial_shape` exactly once, in C order."""
    if max_voxels < 1:
        raise ValueError("max_voxels must be positive")
    if spatial_chunks is None:  # contiguous storage: slabs of whole trailing rows
        chunk = [1] * (len(spatial_shape) - 1) + [spatial_shape[-1]]
    else:
        chunk = [max(1, min(c, s)) for c, s in zip(spatial_chunks, spatial_shape)]
    zero = (0,) * len(spatial_shape)
    if math.prod(chunk) <= max_voxels:
        if spatial_chunks is None:  # rows: grow the last axis first, the order they lie in on disk
            unit = tuple(_grow(chunk, spatial_shape, max_voxels, reversed(range(len(spatial_shape)))))
        else:
            unit = tuple(_grow_chunked(chunk, spatial_shape, max_voxels))
        return [ReadUnit(region, (region,)) for region in _tile(spatial_shape, unit, zero)]
    piece = _split(tuple(chunk), max_voxels)
    units = []
    for region in _tile(spatial_shape, tuple(chunk), zero):
        shape = region_shape(region)
        origin = tuple(s.start for s in region)
        units.append(ReadUnit(region, tuple(_tile(shape, piece, origin))))
    return units
