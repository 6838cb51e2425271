#!/usr/bin/env python
"""Write segcal's bundled sample data (sample_data/), bit for bit reproducibly.

    python scripts/make_sample_data.py                 # (re)write sample_data/ in the repository
    python scripts/make_sample_data.py --out /tmp/sd   # somewhere else (the tests compare the two)

Contents (see sample_data/README.md for the layout, the classes and the miscalibration applied):
* street_val.h5, street_test.h5: 2D street-scene-like images, 8 classes, ignore label 255, root arrays with a
  batch axis: logits (N, C, H, W) float16, labels (N, H, W) uint8.
* brain_val.zarr, brain_test.zarr: Zarr v3, 3D brain-MRI-like volumes, 4 classes, one group per case:
  <case>/logits (C, D, H, W) float16, <case>/labels (D, H, W) uint8.
* SHA256SUMS: the checksum of every file above.

Reproducibility: every case comes from segcal_cli.synthetic with a fixed seed; HDF5 objects are written
without timestamps (track_times=False) and with fixed compression settings; Zarr metadata holds nothing
time-dependent. Running the script twice gives identical bytes (checked by tests/test_sample_data.py).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from pathlib import Path

import h5py
import numpy as np
import zarr
from zarr.codecs import BloscCodec

from segcal_cli import synthetic

REPO = Path(__file__).resolve().parents[1]

STREET_SHAPE = (96, 128)
STREET_SPLITS = {"val": [1000 + i for i in range(8)], "test": [2000 + i for i in range(8)]}
STREET_LOGITS_CHUNKS = (1, len(synthetic.STREET_CLASSES), 64, 64)  # per image, all classes together
STREET_LABELS_CHUNKS = (1, 64, 64)

# Shapes differ per case (and along each axis) so that readers that confuse axes or assume one shape fail.
BRAIN_SPLITS = {
    "val": [(3000, (40, 44, 48)), (3001, (44, 40, 46)), (3002, (42, 48, 40))],
    "test": [(4000, (46, 42, 44)), (4001, (40, 46, 42)), (4002, (48, 40, 44))],
}
BRAIN_LOGITS_CHUNKS = (len(synthetic.BRAIN_CLASSES), 16, 32, 32)
BRAIN_LABELS_CHUNKS = (16, 32, 32)


def _generator_attrs(kind: str, case, *, json_strings: bool) -> dict:
    """Generator description; HDF5 attributes cannot hold nested objects, so there they are JSON strings."""
    mis = case.params["miscalibration"]
    return {
        "generator": "segcal_cli.synthetic",
        "generator_function": f"make_{kind}_case",
        "model_logits": "(z* + boundary_noise * exp(-margin*/boundary_width) * e(x)) / temperature"
                        " + class_bias + offset(x)",
        "miscalibration": json.dumps(mis, sort_keys=True) if json_strings else mis,
    }


def write_street(path: Path, seeds: list[int]) -> None:
    cases = [synthetic.make_street_case(seed, STREET_SHAPE) for seed in seeds]
    logits = np.stack([c.logits for c in cases]).astype(np.float16)
    labels = np.stack([c.labels for c in cases]).astype(np.uint8)
    class_names = list(synthetic.STREET_CLASSES)
    with h5py.File(path, "w", libver="earliest", track_order=False) as f:
        common = dict(compression="gzip", compression_opts=6, shuffle=True, track_times=False)
        dl = f.create_dataset("logits", data=logits, chunks=STREET_LOGITS_CHUNKS, **common)
        dy = f.create_dataset("labels", data=labels, chunks=STREET_LABELS_CHUNKS, **common)
        dl.attrs["dimension_names"] = ["case", "class", "y", "x"]
        dl.attrs["kind"] = "logits"
        dl.attrs["class_names"] = class_names
        dl.attrs["ignore_index"] = synthetic.IGNORE_INDEX
        dy.attrs["dimension_names"] = ["case", "y", "x"]
        dy.attrs["kind"] = "labels"
        dy.attrs["class_names"] = class_names
        dy.attrs["ignore_index"] = synthetic.IGNORE_INDEX
        f.attrs["kind"] = "segcal.sample_data.street"
        f.attrs["class_names"] = class_names
        f.attrs["ignore_index"] = synthetic.IGNORE_INDEX
        f.attrs["seeds"] = np.asarray(seeds, dtype=np.int64)
        for key, value in _generator_attrs("street", cases[0], json_strings=True).items():
            f.attrs[key] = value
        f.attrs["generator_params"] = json.dumps(
            {k: v for k, v in cases[0].params.items() if k != "seed"}, sort_keys=True)


def write_brain(path: Path, cases_spec: list[tuple[int, tuple[int, int, int]]]) -> None:
    if path.exists():
        shutil.rmtree(path)
    class_names = list(synthetic.BRAIN_CLASSES)
    compressors = [BloscCodec(cname="zstd", clevel=5, shuffle="shuffle")]
    root = zarr.open_group(path, mode="w", zarr_format=3)
    first = None
    for i, (seed, shape) in enumerate(cases_spec):
        case = synthetic.make_brain_case(seed, shape)
        first = first or case
        group = root.create_group(f"case_{i:03d}")
        group.attrs.update({"seed": seed, "generator_params": case.params})
        logits = group.create_array("logits", shape=case.logits.shape, dtype="float16",
                                    chunks=BRAIN_LOGITS_CHUNKS, compressors=compressors,
                                    dimension_names=["class", "z", "y", "x"],
                                    attributes={"kind": "logits", "class_names": class_names,
                                                "ignore_index": synthetic.IGNORE_INDEX})
        logits[...] = case.logits.astype(np.float16)
        labels = group.create_array("labels", shape=case.labels.shape, dtype="uint8",
                                    chunks=BRAIN_LABELS_CHUNKS, compressors=compressors,
                                    dimension_names=["z", "y", "x"],
                                    attributes={"kind": "labels", "class_names": class_names,
                                                "ignore_index": synthetic.IGNORE_INDEX})
        labels[...] = case.labels.astype(np.uint8)
    root.attrs.update({"kind": "segcal.sample_data.brain", "class_names": class_names,
                       "ignore_index": synthetic.IGNORE_INDEX, "seeds": [s for s, _ in cases_spec],
                       **_generator_attrs("brain", first, json_strings=False)})


def sha256_tree(root: Path) -> dict[str, str]:
    """sha256 of every file under `root` (relative POSIX paths, sorted), SHA256SUMS itself excluded."""
    sums = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != "SHA256SUMS" and p.name != "README.md":
            sums[p.relative_to(root).as_posix()] = hashlib.sha256(p.read_bytes()).hexdigest()
    return sums


def make_sample_data(out: Path) -> dict[str, str]:
    out.mkdir(parents=True, exist_ok=True)
    for split, seeds in STREET_SPLITS.items():
        write_street(out / f"street_{split}.h5", seeds)
    for split, spec in BRAIN_SPLITS.items():
        write_brain(out / f"brain_{split}.zarr", spec)
    sums = sha256_tree(out)
    (out / "SHA256SUMS").write_text("".join(f"{h}  {name}\n" for name, h in sums.items()))
    return sums


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "sample_data",
                        help="output directory (default: sample_data/ in the repository)")
    args = parser.parse_args(argv)
    sums = make_sample_data(args.out)
    total = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    print(f"wrote {len(sums)} files, {total / 1e6:.2f} MB, to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
