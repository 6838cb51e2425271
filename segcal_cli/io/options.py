"""DataOptions: how to find and interpret the arrays in users' containers (spec.md, "Data")."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from segcal_cli.errors import InputError

INPUT_KINDS = ("logits", "logprobs", "probs")

# 2^18 voxels: a 19-class float32 block is 20 MB, so a stream with its read-ahead and a consumer's
# intermediates stays well under 1 GB; and 64K-256K-voxel ops are the fastest on CPU (engineering.md).
DEFAULT_CHUNK_VOXELS = 1 << 18


@dataclass(frozen=True)
class DataOptions:
    logits_key: str = "logits"
    labels_key: str = "labels"
    mask_key: Optional[str] = None
    class_axis: Optional[int] = None
    input_kind: str = "logits"
    ignore_index: int = 255
    device: str = "auto"
    chunk_voxels: Optional[int] = None

    def validate(self) -> "DataOptions":
        if self.input_kind not in INPUT_KINDS:
            raise InputError(f"--input-kind must be one of {', '.join(INPUT_KINDS)}, not {self.input_kind!r}")
        if self.chunk_voxels is not None and self.chunk_voxels < 1:
            raise InputError(f"--chunk-voxels must be a positive number of voxels, not {self.chunk_voxels}")
        dev = self.device
        if not (dev in ("auto", "cpu", "cuda") or (dev.startswith("cuda:") and dev[5:].isdigit())):
            raise InputError(f"--device must be auto, cpu, cuda or cuda:N, not {dev!r}")
        for name, key in (("--logits-key", self.logits_key), ("--labels-key", self.labels_key)):
            if not key:
                raise InputError(f"{name} must not be empty")
        return self

    @property
    def block_voxels(self) -> int:
        return self.chunk_voxels or DEFAULT_CHUNK_VOXELS
