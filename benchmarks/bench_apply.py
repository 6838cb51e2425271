#!/usr/bin/env python
"""`segcal apply` vs a plain block-by-block copy of the same data with the same compression, same run.

    python benchmarks/make_bench_data.py          # once: bench_data/bench.h5 (~2 GB float16)
    python benchmarks/bench_apply.py              # on bench_data/bench.h5
    python benchmarks/bench_apply.py --gb 0.1     # on a generated float16 file of that size (quick try)
    python benchmarks/bench_apply.py --data other.h5 --repeat 2 --json apply_bench.json

Both runs are fresh child processes, timed by wall clock, with peak RSS from `os.wait4` (the child's
`ru_maxrss`), after one untimed read of the input to warm the page cache:
* copy:  h5py/zarr reads of each read unit the engine plans (whole storage chunks), written with plain
         h5py/zarr calls to an output with exactly the storage `apply` uses (same chunks and filters), one
         unit after another in one thread; labels copied the same way;
* apply: `segcal apply CAL DATA -o OUT --dtype float16` with a temperature-scaling artifact (the output
         dtype equals the input's, so both write the same number of bytes).
Done when (issue 5): apply time <= 2x copy time, apply peak RSS < 1 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO / "bench_data" / "bench.h5"


def _copy_child(data: str, out: str) -> None:
    """The baseline: plain unit-by-unit read and write, same output storage as `apply`."""
    import numpy as np

    from segcal_cli.io import DataOptions, open_dataset
    from segcal_cli.io.containers import Container
    from segcal_cli.applying import _copy_units, _unit_chunks
    from segcal_cli.io.writers import AtomicOutput, create_array, output_format, \
        plan_outputs, storage_like

    def plain_array(output, key, shape, dtype, storage):
        """The output array as `apply` stores it (chunks, filters), written through plain h5py / zarr calls:
        segcal's own fast paths (direct HDF5 chunk writes) are what is being measured, not the baseline."""
        if fmt != "hdf5":
            return create_array(output, key, shape, dtype, storage, tuple(f"d{i}" for i in range(len(shape))), {})
        kwargs = dict(storage.hdf5) if storage.chunks is not None else {}
        return output.root.create_dataset(key, shape=shape, dtype=dtype, chunks=storage.chunks, **kwargs)

    with open_dataset([data], DataOptions()) as ds:
        fmt = output_format(Path(out))
        arrays, groups = plan_outputs(ds.cases, "probabilities")
        output = AtomicOutput(Path(out), fmt, True, {})
        with Container(Path(data)) as container:
            for spec in arrays:
                src = container.get_array(spec.input_key)
                case = ds.cases[spec.cases[0]]
                info = Container.info(src)
                storage = storage_like(src, fmt, spec.batched, _unit_chunks(case, ds.options.block_voxels))
                dst = plain_array(output, spec.output_key, info.shape, np.float16, storage)
                for ci in spec.cases:
                    case = ds.cases[ci]
                    for unit in ds.plan(ci):
                        index = case.logits_index(unit.region)
                        dst[index] = np.asarray(src[index])
                if case.labels_key:
                    lab = container.get_array(case.labels_key)
                    linfo = Container.info(lab)
                    grid = _copy_units(linfo)
                    ldst = plain_array(output, groups[spec.cases[0]] + "labels", linfo.shape, linfo.dtype,
                                       storage_like(lab, fmt, False, tuple(s.stop - s.start for s in grid[0].region)))
                    for unit in grid:
                        ldst[unit.region] = np.asarray(lab[unit.region])
        output.commit()


def _timed(cmd: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (GB) of one child process."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    err = proc.stderr.read().decode() if proc.stderr else ""
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{err}")
    return seconds, usage.ru_maxrss * 1024 / 1e9


def _make_data(path: Path, gb: float, classes: int) -> None:
    """A batched float16 file like bench.h5 (chunks (1, C, 256, 256), no compression), random-walk logits."""
    import h5py
    import numpy as np

    side = 512
    per_image = classes * side * side * 2
    images = max(1, round(gb * 1e9 / per_image))
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as f:
        logits = f.create_dataset("logits", shape=(images, classes, side, side), dtype=np.float16,
                                  chunks=(1, classes, 256, 256))
        labels = f.create_dataset("labels", shape=(images, side, side), dtype=np.uint8, chunks=(1, 256, 256))
        for n in range(images):
            logits[n] = (rng.normal(size=(classes, side, side)) * 3).astype(np.float16)
            labels[n] = rng.integers(0, classes, size=(side, side), dtype=np.uint8)


def _in_process(data: Path, cal_path: Path, out: Path, repeat: int) -> dict:
    """Both data paths timed inside this process after one untimed run of each (imports, numba kernels,
    heap growth are paid then): `apply_calibrator` as `segcal apply` calls it, and `_copy_child`."""
    from segcal_cli.applying import apply_calibrator
    from segcal_cli.calibrators import load_artifact
    from segcal_cli.io import DataOptions, open_dataset
    from segcal_cli.memory import reuse_freed_memory

    reuse_freed_memory()
    cal, _ = load_artifact(cal_path)
    times: dict = {"copy": [], "apply": []}
    for attempt in range(repeat + 1):
        for name in ("copy", "apply"):
            start = time.perf_counter()
            if name == "copy":
                _copy_child(str(data), str(out))
            else:
                with open_dataset([str(data)], DataOptions(device="cpu")) as ds:
                    apply_calibrator(ds, cal, out, dtype="float16")
            seconds = time.perf_counter() - start
            shutil.rmtree(out) if out.is_dir() else out.unlink()
            if attempt:
                times[name].append(seconds)
                print(f"{name:5s}  {seconds:7.2f} s  (in this process)", flush=True)
    return times


def _warm(path: Path) -> None:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for file in files:
        with open(file, "rb") as fh:
            while fh.read(1 << 24):
                pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=None, help=f"input container (default {DEFAULT_DATA})")
    parser.add_argument("--gb", type=float, default=None, help="generate a float16 HDF5 input of this size instead")
    parser.add_argument("--classes", type=int, default=19)
    parser.add_argument("--out-format", choices=("h5", "zarr"), default=None, help="default: the input's")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each; the best time counts")
    parser.add_argument("--workdir", type=Path, default=None, help="where outputs go (default: next to the data)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--in-process", action="store_true",
                        help="also time both data paths inside this process, warm (no interpreter, torch or "
                             "numba start-up): what the pipeline itself costs")
    parser.add_argument("--child-copy", nargs=2, metavar=("DATA", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_copy:
        _copy_child(*args.child_copy)
        return

    scratch = Path(tempfile.mkdtemp(prefix="bench_apply_", dir=args.workdir or (
        REPO / "bench_data" if (REPO / "bench_data").is_dir() else None)))
    try:
        if args.gb is not None:
            data = scratch / "input.h5"
            _make_data(data, args.gb, args.classes)
        else:
            data = args.data or DEFAULT_DATA
            if not data.exists():
                raise SystemExit(f"{data} not found: run benchmarks/make_bench_data.py or pass --gb / --data")
        suffix = {"h5": ".h5", "zarr": ".zarr"}[args.out_format] if args.out_format else (
            ".zarr" if data.is_dir() else ".h5")
        import torch

        from segcal_cli.calibrators import get_method, save_artifact

        with __import__("h5py").File(data, "r") if not data.is_dir() else open(os.devnull) as handle:
            classes = handle["logits"].shape[1] if hasattr(handle, "keys") else args.classes
        cal = save_artifact(get_method("ts").from_parameters(classes, {"temperature": torch.tensor(1.5)}),
                            scratch / "ts.json", {"note": "benchmark"})
        _warm(data)
        stored = sum(p.stat().st_size for p in ([data] if data.is_file() else data.rglob("*")) if p.is_file())
        runs = {"copy": [], "apply": []}
        for _ in range(args.repeat):
            for name in ("copy", "apply"):
                out = scratch / f"{name}{suffix}"
                if name == "copy":
                    cmd = [sys.executable, __file__, "--child-copy", str(data), str(out)]
                else:
                    cmd = [sys.executable, "-m", "segcal_cli", "apply", str(cal), str(data), "-o", str(out),
                           "--dtype", "float16", "--quiet", "--device", "cpu"]
                seconds, rss = _timed(cmd)
                runs[name].append({"seconds": seconds, "peak_rss_gb": rss})
                print(f"{name:5s}  {seconds:7.2f} s  {stored / seconds / 1e9:6.3f} GB/s  peak RSS {rss:5.2f} GB",
                      flush=True)
                shutil.rmtree(out) if out.is_dir() else out.unlink()
        if args.in_process:
            runs_in = _in_process(data, cal, scratch / f"in{suffix}", args.repeat)
        best = {k: min(v, key=lambda r: r["seconds"]) for k, v in runs.items()}
        ratio = best["apply"]["seconds"] / best["copy"]["seconds"]
        peak = max(r["peak_rss_gb"] for r in runs["apply"])
        report = {"data": str(data), "stored_gb": stored / 1e9, "output": suffix, "runs": runs,
                  "ratio_apply_over_copy": ratio, "apply_peak_rss_gb": peak,
                  "within_2x": ratio <= 2.0, "under_1gb": peak < 1.0}
        print(f"data {data} ({stored / 1e9:.2f} GB): apply / copy = {ratio:.2f}x "
              f"({'ok' if ratio <= 2 else 'OVER'} 2x), apply peak RSS {peak:.2f} GB "
              f"({'ok' if peak < 1 else 'OVER'} 1 GB)")
        if args.in_process:
            ratio_in = min(runs_in["apply"]) / min(runs_in["copy"])
            report["in_process"] = {**runs_in, "ratio_apply_over_copy": ratio_in}
            print(f"in one process, warm: copy {min(runs_in['copy']):.2f} s, apply {min(runs_in['apply']):.2f} s: "
                  f"apply / copy = {ratio_in:.2f}x")
        if args.json:
            args.json.write_text(json.dumps(report, indent=2) + "\n")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
