"""Cases: one logits array (plus labels and mask) inside a container, and how to read it.

Layouts (spec.md, "Data"):
* root arrays, one case:     logits (C, *spatial)       labels (*spatial)
* root arrays, N cases:      logits (N, C, *spatial)    labels (N, *spatial)
* one group per case:        <group>/logits, <group>/labels

Everything here is decided from metadata alone (shapes, dtypes, names): opening a dataset reads no voxel.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from segcal_cli.errors import InputError
from segcal_cli.io.containers import ArrayInfo, Container, container_stem
from segcal_cli.io.options import DataOptions

CLASS_AXIS_NAMES = {"class", "classes", "channel", "channels", "c"}
BATCH_AXIS_NAMES = {"case", "cases", "batch", "n", "sample", "samples"}


@dataclass(frozen=True)
class CaseInfo:
    id: str
    source: str
    logits_key: str  # full key inside the container
    labels_key: str | None
    mask_key: str | None
    layout: str  # "root" | "batched" | "group"
    group: str | None
    batch_index: int | None
    logits_shape: tuple[int, ...]  # per case, as stored (without the batch axis)
    class_axis: int  # in logits_shape
    stored_classes: int  # size of the class axis as stored (1 = binary sigmoid logit)
    num_classes: int  # after the binary expansion
    spatial_shape: tuple[int, ...]
    chunks: tuple[int, ...] | None  # per case, same rank as logits_shape; None = contiguous
    dtype: np.dtype
    labels_dtype: np.dtype | None = None
    dimension_names: tuple[str, ...] | None = field(default=None)

    @property
    def num_voxels(self) -> int:
        return int(np.prod(self.spatial_shape, dtype=np.int64))

    @property
    def has_labels(self) -> bool:
        return self.labels_key is not None

    @property
    def has_mask(self) -> bool:
        return self.mask_key is not None

    @property
    def spatial_chunks(self) -> tuple[int, ...] | None:
        if self.chunks is None:
            return None
        return tuple(c for i, c in enumerate(self.chunks) if i != self.class_axis)

    def logits_index(self, region: tuple[slice, ...]) -> tuple:
        """The index into the stored logits array for a spatial region (all classes)."""
        per_case = list(region)
        per_case.insert(self.class_axis, slice(None))
        if self.batch_index is not None:
            per_case.insert(0, self.batch_index)
        return tuple(per_case)

    def spatial_index(self, region: tuple[slice, ...]) -> tuple:
        """The index into the stored labels / mask array for a spatial region."""
        if self.batch_index is not None:
            return (self.batch_index, *region)
        return tuple(region)


def _numeric(info: ArrayInfo) -> bool:
    return info.dtype.kind in "fiu"


def _check_numeric(info: ArrayInfo, what: str, source: str, case: str) -> None:
    if not _numeric(info) and not (what != "logits" and info.dtype.kind == "b"):
        raise InputError(f"{what} has a non-numeric dtype ({info.dtype}); expected a real number type",
                         source=source, case=case)


def _resolve_class_axis(
    logits_shape: tuple[int, ...],
    spatial_ref: tuple[int, ...] | None,
    dim_names: tuple[str, ...] | None,
    requested: int | None,
    source: str,
    case: str,
    ref_name: str,
) -> int:
    ndim = len(logits_shape)
    if requested is not None:
        axis = requested + ndim if requested < 0 else requested
        if not 0 <= axis < ndim:
            raise InputError(f"--class-axis {requested} is out of range for logits of shape {logits_shape}",
                             source=source, case=case)
        if spatial_ref is not None:
            rest = logits_shape[:axis] + logits_shape[axis + 1:]
            if rest != spatial_ref:
                raise InputError(
                    f"logits shape {logits_shape} without class axis {requested} is {rest}, "
                    f"but {ref_name} shape is {spatial_ref}", source=source, case=case)
        return axis
    if spatial_ref is not None:
        candidates = [a for a in range(ndim) if logits_shape[:a] + logits_shape[a + 1:] == spatial_ref]
        if len(candidates) == 1:
            return candidates[0]
        if not candidates:
            raise InputError(f"logits shape {logits_shape} does not match {ref_name} shape {spatial_ref} "
                             f"(no axis of the logits is the class axis)", source=source, case=case)
        if dim_names is not None:
            named = [a for a in candidates if dim_names[a].lower() in CLASS_AXIS_NAMES]
            if len(named) == 1:
                return named[0]
        raise InputError(
            f"ambiguous class axis: removing any of axes {candidates} of logits shape {logits_shape} gives "
            f"the {ref_name} shape {spatial_ref}; pass --class-axis", source=source, case=case)
    if dim_names is not None:
        named = [a for a, n in enumerate(dim_names) if n.lower() in CLASS_AXIS_NAMES]
        if len(named) == 1:
            return named[0]
    return 0  # no labels, mask or names: classes first, the layout every framework but MONAI writes


def _is_batched(linfo: ArrayInfo, ref: ArrayInfo | None, requested: int | None, source: str, case: str,
                ref_name: str) -> bool:
    shape = linfo.shape
    names = linfo.dimension_names
    if names is not None and names[0].lower() in BATCH_AXIS_NAMES:
        return True
    if names is not None and names[0].lower() in CLASS_AXIS_NAMES:
        return False
    if ref is None:
        return False  # no labels, mask or names: one case (name the axes 'case', 'class', ... to batch)
    if len(ref.shape) != len(shape) - 1:
        raise InputError(f"logits shape {shape} and {ref_name} shape {ref.shape} do not match "
                         f"(expected {ref_name} with one axis fewer than the logits)", source=source, case=case)
    if requested is not None:
        per_case = requested + len(shape) - 1 if requested < 0 else requested
        unbatched_axis = requested + len(shape) if requested < 0 else requested
        fits_batched = 0 <= per_case < len(shape) - 1 and shape[:per_case + 1] + shape[per_case + 2:] == ref.shape
        fits_single = 0 <= unbatched_axis < len(shape) and shape[:unbatched_axis] + shape[unbatched_axis + 1:] == ref.shape
        return fits_batched and not fits_single
    candidates = [a for a in range(len(shape)) if shape[:a] + shape[a + 1:] == ref.shape]
    return candidates == [1] and len(shape) >= 4


def _case(
    container: Container,
    opts: DataOptions,
    prefix: str,
    case_id: str,
    layout: str,
    require_labels: bool,
) -> list[CaseInfo]:
    """The case(s) in one group (or the root, prefix ''); several when the root arrays are batched."""
    source = str(container.path)
    logits_key = prefix + opts.logits_key
    labels_key = prefix + opts.labels_key
    mask_key = prefix + opts.mask_key if opts.mask_key else None
    logits = container.get_array(logits_key)
    if logits is None:
        raise InputError(f"missing key {opts.logits_key!r}", source=source, case=case_id)
    linfo = Container.info(logits)
    _check_numeric(linfo, "logits", source, case_id)
    if 0 in linfo.shape or len(linfo.shape) < 2:
        raise InputError(f"logits array is empty or has too few axes (shape {linfo.shape})",
                         source=source, case=case_id)
    labels = container.get_array(labels_key)
    if labels is None and require_labels:
        raise InputError(f"missing key {opts.labels_key!r} (labels are needed here)", source=source, case=case_id)
    binfo = Container.info(labels) if labels is not None else None
    if binfo is not None:
        _check_numeric(binfo, "labels", source, case_id)
        if binfo.dtype.kind == "f":
            raise InputError(f"labels have a floating-point dtype ({binfo.dtype}); store integer class indices",
                             source=source, case=case_id)
    minfo = None
    if mask_key is not None:
        mask = container.get_array(mask_key)
        if mask is None:
            raise InputError(f"missing key {opts.mask_key!r} (given by --mask-key)", source=source, case=case_id)
        minfo = Container.info(mask)
        _check_numeric(minfo, "mask", source, case_id)
    ref = binfo or minfo
    ref_name = "labels" if binfo is not None else "mask"
    if binfo is not None and minfo is not None and minfo.shape != binfo.shape:
        raise InputError(f"mask shape {minfo.shape} does not match labels shape {binfo.shape}",
                         source=source, case=case_id)

    # Batched or not. Per spec, one case is (C, *spatial) with labels (*spatial) and N cases are
    # (N, C, *spatial) with labels (N, *spatial): both have labels one axis short of the logits, so the
    # layout follows from which axis is the class axis (1 -> batched), or from the dimension names.
    batched = _is_batched(linfo, ref, opts.class_axis, source, case_id, ref_name)
    names = linfo.dimension_names
    if batched:
        n_cases = linfo.shape[0]
        if ref is not None and ref.shape[0] != n_cases:
            raise InputError(f"logits hold {n_cases} cases but {ref_name} hold {ref.shape[0]}",
                             source=source, case=case_id)
        per_case_shape = linfo.shape[1:]
        per_case_ref = ref.shape[1:] if ref is not None else None
        per_case_chunks = linfo.chunks[1:] if linfo.chunks is not None else None
        names = names[1:] if names is not None else None
    else:
        n_cases = 1
        per_case_shape = linfo.shape
        per_case_ref = ref.shape if ref is not None else None
        per_case_chunks = linfo.chunks
    axis = _resolve_class_axis(per_case_shape, per_case_ref, names, opts.class_axis, source, case_id, ref_name)
    spatial = per_case_shape[:axis] + per_case_shape[axis + 1:]
    if len(spatial) == 0 or 0 in spatial:
        raise InputError(f"logits have no voxels (shape {linfo.shape})", source=source, case=case_id)
    stored_classes = per_case_shape[axis]
    num_classes = 2 if stored_classes == 1 else stored_classes
    cases = []
    for index in range(n_cases):
        cid = f"{case_id}[{index}]" if batched else case_id
        cases.append(CaseInfo(
            id=cid, source=source, logits_key=logits_key,
            labels_key=labels_key if labels is not None else None, mask_key=mask_key,
            layout="batched" if batched and layout == "root" else layout,
            group=prefix.rstrip("/") or None, batch_index=index if batched else None,
            logits_shape=tuple(per_case_shape), class_axis=axis, stored_classes=stored_classes,
            num_classes=num_classes, spatial_shape=tuple(spatial), chunks=per_case_chunks,
            dtype=linfo.dtype, labels_dtype=binfo.dtype if binfo is not None else None,
            dimension_names=names,
        ))
    return cases


def discover_cases(container: Container, opts: DataOptions, require_labels: bool) -> list[CaseInfo]:
    """Every case in a container, in a deterministic order (root first, then groups sorted by path)."""
    stem = container_stem(container.path)
    if container.get_array(opts.logits_key) is not None:
        return _case(container, opts, "", stem, "root", require_labels)
    groups = container.groups_with(opts.logits_key)
    if not groups:
        raise InputError(f"missing key {opts.logits_key!r}: no array of that name at the root or in any group",
                         source=str(container.path))
    cases: list[CaseInfo] = []
    for group in groups:
        cases.extend(_case(container, opts, group + "/", f"{stem}/{group}", "group", require_labels))
    return cases


def describe_sources(cases: list[CaseInfo]) -> list[str]:
    return sorted({str(Path(c.source)) for c in cases})
