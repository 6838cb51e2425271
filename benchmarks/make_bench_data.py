#!/usr/bin/env python
"""Write large synthetic benchmark data: one HDF5 file and a Zarr copy of it (git-ignored bench_data/).

    python benchmarks/make_bench_data.py              # ~2 GB of float16 logits (1 GB = 1e9 bytes)
    python benchmarks/make_bench_data.py --gb 0.2     # small, for a quick try

Layout (spec.md "Data", root arrays with a batch axis), Cityscapes-sized street scenes:
* bench.h5:   logits (N, 19, 1024, 2048) float16, chunks (1, 19, 256, 256) = 2.4 MiB (one image, all classes:
              readers fetch every class of a block with one chunk read); labels (N, 1024, 2048) uint8, chunks
              (1, 256, 256), ignore label 255. **No compression** by default: float16 logits compress only
              1.03x with lzf (measured), while lzf decoding cut a plain chunk read from ~2.6 GB/s to ~0.1 GB/s,
              so compression would only hide the streaming layer's own cost. `--h5-compression lzf|gzip` is there
              to measure that case.
* bench.zarr: Zarr v3 group with the same two arrays, same chunks, Blosc lz4 with byte shuffle (zarr's usual
              kind of codec, fast to decode), `dimension_names` and attributes (kind, class_names, ignore_index).

Cases come from `segcal_cli.synthetic.make_case` (one seed per image): smooth class scores with a dominant
class and a documented miscalibration, so benchmarks of fit/evaluate see realistic statistics. Images are
generated in `--workers` processes (default 2) while the main process writes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CITYSCAPES_CLASSES = ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic_light", "traffic_sign",
                      "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
                      "motorcycle", "bicycle")
LOGITS_CHUNK_SIDE = 256


def _class_prior(num_classes: int) -> list[float]:
    prior = np.linspace(1.5, -3.0, num_classes)
    prior[0] = 3.0  # a dominant class
    return [float(p) for p in prior]


def generator_settings(num_classes: int) -> dict:
    from segcal_cli.synthetic import Miscalibration

    mis = Miscalibration(temperature=0.55, class_bias=None, boundary_noise=1.5, boundary_width=1.0,
                         boundary_length_scale=9.0, offset_mean=2.0, offset_std=2.5, offset_length_scale=200.0)
    return {"class_prior": _class_prior(num_classes), "amplitude": 5.0, "length_scale": 40.0,
            "ignore_fraction": 0.03, "miscalibration": mis}


def generate_image(args: tuple[int, int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """One image: (float16 logits (C, H, W), uint8 labels (H, W)). Runs in a worker process."""
    seed, num_classes, height, width = args
    from segcal_cli import synthetic

    settings = generator_settings(num_classes)
    names = CITYSCAPES_CLASSES if num_classes == len(CITYSCAPES_CLASSES) else None
    case = synthetic.make_case((height, width), num_classes, seed, class_names=names, **settings)
    return case.logits.astype(np.float16), case.labels.astype(np.uint8)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=2.0, help="size of the float16 logits in GB (1e9 bytes)")
    parser.add_argument("--out", type=Path, default=REPO / "bench_data", help="output directory")
    parser.add_argument("--classes", type=int, default=19)
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    parser.add_argument("--h5-compression", choices=["none", "lzf", "gzip"], default="none")
    parser.add_argument("--no-zarr", action="store_true", help="write only the HDF5 file")
    parser.add_argument("--workers", type=int, default=2, help="generator processes (0: generate in this process)")
    args = parser.parse_args(argv)

    import h5py
    import zarr
    from zarr.codecs import BloscCodec

    C, H, W = args.classes, args.height, args.width
    per_image = C * H * W * 2
    n_images = max(1, int(round(args.gb * 1e9 / per_image)))
    args.out.mkdir(parents=True, exist_ok=True)
    h5_path = args.out / "bench.h5"
    zarr_path = args.out / "bench.zarr"
    names = list(CITYSCAPES_CLASSES) if C == len(CITYSCAPES_CLASSES) else [f"class_{k}" for k in range(C)]
    settings = generator_settings(C)
    description = {"generator": "segcal_cli.synthetic.make_case", "seeds": [args.seed + i for i in range(n_images)],
                   **{k: v for k, v in settings.items() if k != "miscalibration"},
                   "miscalibration": settings["miscalibration"].as_dict()}
    side = LOGITS_CHUNK_SIDE
    logits_chunks = (1, C, min(side, H), min(side, W))
    labels_chunks = (1, min(side, H), min(side, W))
    print(f"{n_images} images of {C} x {H} x {W}: {n_images * per_image / 1e9:.2f} GB of float16 logits, "
          f"chunks {logits_chunks} ({np.prod(logits_chunks) * 2 / 2**20:.1f} MiB)", flush=True)

    compression = None if args.h5_compression == "none" else args.h5_compression
    start = time.perf_counter()
    with h5py.File(h5_path, "w") as h5:
        h5_logits = h5.create_dataset("logits", shape=(n_images, C, H, W), dtype="float16",
                                      chunks=logits_chunks, compression=compression)
        h5_labels = h5.create_dataset("labels", shape=(n_images, H, W), dtype="uint8",
                                      chunks=labels_chunks, compression=compression)
        for ds, dims, kind in ((h5_logits, ["case", "class", "y", "x"], "logits"),
                               (h5_labels, ["case", "y", "x"], "labels")):
            ds.attrs["dimension_names"] = dims
            ds.attrs["kind"] = kind
            ds.attrs["class_names"] = names
            ds.attrs["ignore_index"] = 255
        h5.attrs["generator"] = json.dumps(description)
        z_root = None
        if not args.no_zarr:
            z_root = zarr.open_group(zarr_path, mode="w", zarr_format=3)
            codec = [BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")]
            z_logits = z_root.create_array("logits", shape=(n_images, C, H, W), dtype="float16",
                                           chunks=logits_chunks, compressors=codec,
                                           dimension_names=["case", "class", "y", "x"],
                                           attributes={"kind": "logits", "class_names": names, "ignore_index": 255})
            z_labels = z_root.create_array("labels", shape=(n_images, H, W), dtype="uint8",
                                           chunks=labels_chunks, compressors=codec,
                                           dimension_names=["case", "y", "x"],
                                           attributes={"kind": "labels", "class_names": names, "ignore_index": 255})
            z_root.attrs["generator"] = description
        jobs = [(args.seed + i, C, H, W) for i in range(n_images)]
        # spawn, not fork: zarr runs an event-loop thread (engineering.md); --workers 0 generates in-process.
        pool = (ProcessPoolExecutor(max_workers=args.workers, mp_context=get_context("spawn"))
                if args.workers > 0 else None)
        try:
            images = pool.map(generate_image, jobs) if pool is not None else map(generate_image, jobs)
            for i, (logits, labels) in enumerate(images):
                h5_logits[i] = logits
                h5_labels[i] = labels
                if z_root is not None:
                    z_logits[i] = logits
                    z_labels[i] = labels
                print(f"  image {i + 1}/{n_images}  {time.perf_counter() - start:.0f} s", flush=True)
        finally:
            if pool is not None:
                pool.shutdown()

    elapsed = time.perf_counter() - start
    size = h5_path.stat().st_size
    print(f"wrote {h5_path} ({size / 1e9:.2f} GB)")
    if not args.no_zarr:
        zsize = sum(p.stat().st_size for p in zarr_path.rglob("*") if p.is_file())
        print(f"wrote {zarr_path} ({zsize / 1e9:.2f} GB, {n_images * per_image / zsize:.2f}x smaller than raw)")
    print(f"in {elapsed:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
