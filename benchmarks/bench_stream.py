#!/usr/bin/env python
"""Streaming read speed and memory: plain chunk-by-chunk reads vs segcal's streaming layer, on the same files.

    python benchmarks/make_bench_data.py         # once: bench_data/bench.h5 and bench_data/bench.zarr
    python benchmarks/bench_stream.py            # timings (warm page cache) and peak RSS
    python benchmarks/bench_stream.py --formats h5 --repeat 1 --chunk-voxels 1048576 --json out.json

For each container format, in this one process:
* plain: HDF5 with h5py `iter_chunks()` + `read_direct` into one preallocated buffer (chunk cache sized for
  a chunk; each chunk holds every class, so one read per block); Zarr by whole chunks (`arr[chunk slices]`).
  Labels are read the same way, chunk by chunk.
* segcal stream: `segcal_cli.io.open_dataset([...]).stream()`, every block delivered as CPU tensors (float32
  logits (C, n), int64 labels, bool valid), i.e. reading + validation + conversion.
* segcal iter_raw: the io layer's reads alone (`Dataset.iter_raw()`, numpy as stored), to tell read cost
  from conversion cost.
* stream float16: `stream(keep_float16=True)`, what `segcal evaluate` and `apply --method ts` use: float16
  logits as stored, checked finite, classes first (no float32 copy); labels and validity as above.
Throughput is stored bytes (float16 logits + uint8 labels) per second; the best of `--repeat` rounds after
one untimed warm-up read. Each round runs every reader once, so a drift in the machine's speed hits them
alike. "vs plain" is the throughput ratio of the bests; "time ratio" the median over rounds of segcal's
seconds over the plain read's seconds in the same round.

Peak memory: each measurement runs again in a fresh child process (`--child`), which reports
`resource.getrusage(RUSAGE_SELF).ru_maxrss`; an `idle` child (imports, opens the dataset, reads nothing)
gives the baseline, so the stream's own footprint is peak minus idle.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def _stored_bytes(path: Path) -> int:
    """Bytes of logits + labels as stored uncompressed (the same numerator for every reader)."""
    if path.suffix == ".h5":
        import h5py

        with h5py.File(path, "r") as f:
            return sum(f[k].size * f[k].dtype.itemsize for k in ("logits", "labels"))
    import zarr

    g = zarr.open_group(path, mode="r")
    return sum(int(np.prod(g[k].shape)) * g[k].dtype.itemsize for k in ("logits", "labels"))


def plain_h5(path: Path) -> int:
    import h5py

    with h5py.File(path, "r") as probe:
        chunk_bytes = int(np.prod(probe["logits"].chunks)) * probe["logits"].dtype.itemsize
    voxels = 0
    # A cache that holds one logits chunk (h5py's default may be smaller than a chunk: engineering.md).
    with h5py.File(path, "r", rdcc_nbytes=2 * chunk_bytes, rdcc_nslots=10007) as f:
        for key in ("logits", "labels"):
            ds = f[key]
            buf = np.empty(ds.chunks, dtype=ds.dtype)
            for sel in ds.iter_chunks():
                shape = tuple(s.stop - s.start for s in sel)
                if shape == buf.shape:
                    ds.read_direct(buf, source_sel=sel)
                else:  # edge chunk
                    np.asarray(ds[sel])
                if key == "labels":
                    voxels += int(np.prod(shape))
    return voxels


def _chunk_slices(shape, chunks):
    grids = [range(0, s, c) for s, c in zip(shape, chunks)]
    for corner in np.ndindex(*[len(g) for g in grids]):
        yield tuple(slice(g[i], min(g[i] + c, s)) for g, i, c, s in zip(grids, corner, chunks, shape))


def plain_zarr(path: Path) -> int:
    import zarr

    g = zarr.open_group(path, mode="r")
    voxels = 0
    for key in ("logits", "labels"):
        arr = g[key]
        for sel in _chunk_slices(arr.shape, arr.chunks):
            block = arr[sel]
            if key == "labels":
                voxels += block.size
    return voxels


def segcal_stream(path: Path, chunk_voxels: int | None, keep_float16: bool = False) -> int:
    from segcal_cli.io import DataOptions, open_dataset

    options = DataOptions(device="cpu", chunk_voxels=chunk_voxels)
    voxels = 0
    with open_dataset([str(path)], options, require_labels=True) as ds:
        for block in ds.stream(keep_float16=keep_float16):
            voxels += int(block.logits.shape[1])
    return voxels


def segcal_raw(path: Path, chunk_voxels: int | None) -> int:
    """The io layer alone (`Dataset.iter_raw`: stored numpy arrays, no validation, conversion or tensors)."""
    from segcal_cli.io import DataOptions, open_dataset

    voxels = 0
    with open_dataset([str(path)], DataOptions(device="cpu", chunk_voxels=chunk_voxels), require_labels=True) as ds:
        for raw in ds.iter_raw():
            voxels += int(raw.labels.size)
    return voxels


def segcal_idle(path: Path, chunk_voxels: int | None) -> int:
    import torch  # noqa: F401  (what every segcal command pays)

    from segcal_cli.io import DataOptions, open_dataset

    with open_dataset([str(path)], DataOptions(device="cpu", chunk_voxels=chunk_voxels), require_labels=True) as ds:
        return 0 * ds.total_voxels


def run_reader(kind: str, path: Path, chunk_voxels: int | None) -> int:
    if kind == "plain":
        return plain_h5(path) if path.suffix == ".h5" else plain_zarr(path)
    if kind == "segcal":
        return segcal_stream(path, chunk_voxels)
    if kind == "segcal-f16":
        return segcal_stream(path, chunk_voxels, keep_float16=True)
    if kind == "segcal-raw":
        return segcal_raw(path, chunk_voxels)
    if kind == "idle":
        return segcal_idle(path, chunk_voxels)
    raise ValueError(kind)


def timed_rounds(kinds: list[str], path: Path, chunk_voxels: int | None,
                 repeat: int) -> tuple[dict[str, list[float]], dict[str, int]]:
    """Seconds per reader per round; each round runs every reader once, so a drift in the machine's speed
    (this project's VMs drift by 15-30% over a minute) hits every reader alike instead of the last ones."""
    seconds: dict[str, list[float]] = {kind: [] for kind in kinds}
    voxels: dict[str, int] = {}
    for _ in range(repeat):
        for kind in kinds:
            t0 = time.perf_counter()
            voxels[kind] = run_reader(kind, path, chunk_voxels)
            seconds[kind].append(time.perf_counter() - t0)
    return seconds, voxels


def child_peak_rss(kind: str, path: Path, chunk_voxels: int | None) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, str(path)]
    if chunk_voxels:
        cmd += ["--chunk-voxels", str(chunk_voxels)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=REPO)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=REPO / "bench_data")
    parser.add_argument("--formats", default="h5,zarr", help="comma-separated: h5, zarr")
    parser.add_argument("--repeat", type=int, default=2, help="timed runs per reader; the best is reported")
    parser.add_argument("--chunk-voxels", type=int, default=None, help="segcal --chunk-voxels (default: its own)")
    parser.add_argument("--no-rss", action="store_true", help="skip the peak-memory child processes")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--child", nargs=2, metavar=("KIND", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        kind, path = args.child[0], Path(args.child[1])
        t0 = time.perf_counter()
        voxels = run_reader(kind, path, args.chunk_voxels)
        seconds = time.perf_counter() - t0
        peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        hwm_kb = None
        try:  # the mm's own high-water mark; ru_maxrss also carries the parent's RSS at fork over exec
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    hwm_kb = int(line.split()[1])
        except OSError:
            pass
        print(json.dumps({"kind": kind, "path": str(path), "seconds": seconds, "voxels": voxels,
                          "peak_rss_mb": peak_kb / 1024, "vm_hwm_mb": None if hwm_kb is None else hwm_kb / 1024}))
        return 0

    files = {"h5": args.data_dir / "bench.h5", "zarr": args.data_dir / "bench.zarr"}
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    for fmt in formats:
        if fmt not in files:
            parser.error(f"unknown format {fmt!r}")
        if not files[fmt].exists():
            parser.error(f"{files[fmt]} not found: run benchmarks/make_bench_data.py first")
    results = {"chunk_voxels": args.chunk_voxels, "formats": {fmt: {} for fmt in formats}}

    # Memory first, while this parent is still small: Linux carries a process's RSS at fork over into the
    # child's ru_maxrss, so children started from a big parent would all report at least its size.
    if not args.no_rss:
        print("peak RSS, one fresh child process per measurement (ru_maxrss, MB):")
        for fmt in formats:
            path = files[fmt]
            rss = {kind: child_peak_rss(kind, path, args.chunk_voxels) for kind in ("idle", "plain", "segcal")}
            results["formats"][fmt]["peak_rss_mb"] = {k: v["peak_rss_mb"] for k, v in rss.items()}
            results["formats"][fmt]["vm_hwm_mb"] = {k: v["vm_hwm_mb"] for k, v in rss.items()}
            print(f"  {fmt:5} idle (imports + open) {rss['idle']['peak_rss_mb']:6.0f}   "
                  f"plain read {rss['plain']['peak_rss_mb']:6.0f}   segcal stream {rss['segcal']['peak_rss_mb']:6.0f}"
                  f"   (stream - idle: {rss['segcal']['peak_rss_mb'] - rss['idle']['peak_rss_mb']:.0f})", flush=True)

    import torch

    results["torch_threads"] = torch.get_num_threads()
    print(f"torch threads: {torch.get_num_threads()}, segcal chunk_voxels: {args.chunk_voxels or 'default'}, "
          f"best of {args.repeat} interleaved rounds, warm page cache; 'vs plain' = throughput ratio of the bests, "
          f"'time ratio' = median over rounds of segcal seconds / plain seconds")
    print(f"{'format':6} {'reader':16} {'seconds':>8} {'GB/s':>7} {'Mvox/s':>8} {'vs plain':>9} {'time ratio':>12}")
    labels = {"plain": None, "segcal-raw": "segcal iter_raw", "segcal": "segcal stream",
              "segcal-f16": "stream float16"}
    for fmt in formats:
        path = files[fmt]
        nbytes = _stored_bytes(path)
        run_reader("plain", path, None)  # warm-up: page cache, imports
        run_reader("segcal-raw", path, args.chunk_voxels)
        row = results["formats"][fmt]
        row["stored_gb"] = nbytes / 1e9
        kinds = ["plain", "segcal-raw", "segcal", "segcal-f16"]
        rounds, counts = timed_rounds(kinds, path, args.chunk_voxels, args.repeat)
        for kind in kinds:
            seconds, voxels = min(rounds[kind]), counts[kind]
            if voxels != counts["plain"]:
                raise SystemExit(f"voxel counts differ: plain {counts['plain']} {kind} {voxels}")
            # the ratio of the bests, and the median over rounds of the ratio within a round
            median = statistics.median(t / p for t, p in zip(rounds[kind], rounds["plain"]))
            row[kind] = {"seconds": seconds, "gb_per_s": nbytes / 1e9 / seconds, "mvox_per_s": voxels / 1e6 / seconds,
                         "voxels": voxels, "rounds": rounds[kind], "median_time_ratio": median}
            r = row[kind]
            ratio = r["gb_per_s"] / row["plain"]["gb_per_s"]
            label = labels[kind] or ("plain h5py" if fmt == "h5" else "plain zarr")
            shown = f"{ratio:.2f}x" if kind != "plain" else ""
            slower = f"{median:.2f}" if kind != "plain" else ""
            print(f"{fmt:6} {label:16} {r['seconds']:8.2f} {r['gb_per_s']:7.2f} {r['mvox_per_s']:8.1f} {shown:>9}"
                  f" {slower:>12}", flush=True)
        row["ratio"] = row["segcal"]["gb_per_s"] / row["plain"]["gb_per_s"]
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
