#!/usr/bin/env python
"""segcal evaluate vs torchmetrics and fiducio doing the same work, on the same data from the same file.

    python benchmarks/make_bench_data.py                    # once: bench_data/bench.h5 (2 GB float16)
    python benchmarks/bench_evaluate.py                     # all cases; peers on --peer-cases of them
    python benchmarks/bench_evaluate.py --cases 2 --peer-cases 2 --json out.json    # small and quick

The work: pooled 15-bin top-label ECE + NLL + Brier + per-class Dice, uncalibrated, ignore label 255.
* segcal: the `evaluate` pipeline (open_dataset -> stream -> Evaluation), reading the file, with
  `--metrics ece,nll,brier,dice` (it still keeps the reliability bins, the confusion matrix and per-case
  values). At this size the per-voxel work runs in the fused numba kernel (metrics/fused.py; SEGCAL_FUSED=0
  for the eager torch path, `--compile` for torch.compile). Timed warm, like the plain read: the first run in
  the process (numba import, kernel load, heap growth) is reported apart. Threads: torch's default, or
  OMP_NUM_THREADS.
* plain read: h5py chunk by chunk (read_direct into one buffer, a chunk cache sized for a chunk), logits and
  labels; the floor for any streaming tool.
* torchmetrics: from an in-memory float32 copy (not timed: loading is given to the peers for free), per image:
  softmax, MulticlassCalibrationError (stateful, pooled), F.cross_entropy (NLL), Brier in torch,
  MulticlassF1Score(average=None) = per-class Dice.
* fiducio: from the same in-memory copy, pooled over all peer images at once (its API takes the whole batch):
  softmax, expected_calibration_error, negative_log_likelihood, brier_score; Dice from a torch confusion
  matrix (fiducio has no Dice).
Peak RSS of segcal is measured in a fresh child process (`--child`, started with fork + exec, so its VmHWM
is its own, not the parent's), with an idle child as the baseline.
Ratios to the peers are per voxel on the same `--peer-cases` images (segcal reading them from the file, the
peers working from memory).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


METRICS = ("ece", "nll", "brier", "dice")  # the work the peers do (--metrics of segcal evaluate)


def segcal_evaluate(path: Path, cases: int, chunk_voxels: int | None, metrics=METRICS,
                    compile_stats: bool | None = False) -> tuple[float, dict]:
    """The `segcal evaluate` pipeline without the CLI around it; the time includes any compiling."""
    import torch

    from segcal_cli.io import DataOptions, open_dataset
    from segcal_cli.metrics.evaluation import Evaluation

    start = time.perf_counter()
    with open_dataset([str(path)], DataOptions(device="cpu", chunk_voxels=chunk_voxels), require_labels=True) as ds:
        chosen = list(range(min(cases, len(ds.cases))))
        ev = Evaluation(ds.num_classes, [c.id for c in ds.cases], [c.num_voxels for c in ds.cases],
                        metrics=metrics, compile=compile_stats)
        with torch.inference_mode():
            for block in ds.stream(chosen, keep_float16=ev.fused):  # as `segcal evaluate` does
                ev.add_block(block.case_index, block.logits, block.labels, block.valid)
        result = ev.finish()
    return time.perf_counter() - start, result.uncalibrated["pooled"]


def plain_read(path: Path, cases: int) -> float:
    import h5py

    start = time.perf_counter()
    with h5py.File(path, "r") as probe:
        chunk_bytes = int(np.prod(probe["logits"].chunks)) * 2
    with h5py.File(path, "r", rdcc_nbytes=2 * chunk_bytes, rdcc_nslots=10007) as f:
        for key in ("logits", "labels"):
            ds = f[key]
            buf = np.empty(ds.chunks, ds.dtype)
            for sel in ds.iter_chunks():
                if sel[0].start >= cases:
                    continue
                shape = tuple(s.stop - s.start for s in sel)
                view = buf if shape == buf.shape else np.empty(shape, ds.dtype)
                ds.read_direct(view, source_sel=sel)
    return time.perf_counter() - start


def load_memory(path: Path, cases: int):
    import h5py

    with h5py.File(path, "r") as f:
        return f["logits"][:cases], f["labels"][:cases]


def torchmetrics_work(logits16, labels) -> tuple[float, dict]:
    import torch
    import torch.nn.functional as F
    from torchmetrics.classification import MulticlassCalibrationError, MulticlassF1Score

    C = logits16.shape[1]
    ece = MulticlassCalibrationError(num_classes=C, n_bins=15, norm="l1", ignore_index=255, validate_args=False)
    dice = MulticlassF1Score(num_classes=C, average="none", ignore_index=255, validate_args=False)
    nll_sum = brier_sum = 0.0
    count = 0
    elapsed = 0.0
    for i in range(logits16.shape[0]):
        z = torch.from_numpy(logits16[i : i + 1].astype(np.float32))  # the in-memory copy (untimed)
        y = torch.from_numpy(labels[i : i + 1].astype(np.int64))
        start = time.perf_counter()
        probs = torch.softmax(z, dim=1)
        ece.update(probs, y)
        dice.update(probs, y)
        nll_sum += float(F.cross_entropy(z, y, ignore_index=255, reduction="sum"))
        valid = y != 255
        yv = torch.where(valid, y, 0)
        p_y = probs.gather(1, yv.unsqueeze(1)).squeeze(1)
        brier_sum += float((((probs * probs).sum(1) - 2 * p_y + 1) * valid).sum())
        count += int(valid.sum())
        elapsed += time.perf_counter() - start
    start = time.perf_counter()
    out = {"ece": float(ece.compute()), "nll": nll_sum / count, "brier": brier_sum / count,
           "dice": dice.compute().tolist()}
    return elapsed + time.perf_counter() - start, out


def fiducio_work(logits16, labels) -> tuple[float, dict]:
    import fiducio
    import torch

    z = torch.from_numpy(logits16.astype(np.float32))  # the in-memory copy (untimed)
    y = torch.from_numpy(labels.astype(np.int64))
    C = z.shape[1]
    start = time.perf_counter()
    probs = torch.softmax(z, dim=1)
    del z
    out = {"ece": fiducio.expected_calibration_error(probs, y, ignore_index=255, n_bins=15),
           "nll": fiducio.negative_log_likelihood(probs, y, ignore_index=255),
           "brier": fiducio.brier_score(probs, y, ignore_index=255)}
    valid = y != 255
    pred = probs.max(1).indices
    conf = torch.bincount((y[valid] * C + pred[valid]), minlength=C * C).view(C, C).double()
    tp = conf.diag()
    out["dice"] = (2 * tp / (conf.sum(0) + conf.sum(1))).tolist()
    return time.perf_counter() - start, out


def child(args) -> None:
    if args.child == "segcal":
        segcal_evaluate(args.data, args.cases, args.chunk_voxels, compile_stats=args.compile)
    elif args.child == "idle":
        import torch  # noqa: F401

        from segcal_cli.io import DataOptions, open_dataset

        open_dataset([str(args.data)], DataOptions(device="cpu"), require_labels=True)
    # VmHWM belongs to this process image (ru_maxrss would carry the parent's peak across fork + exec)
    with open("/proc/self/status") as status:
        hwm_kb = next((int(line.split()[1]) for line in status if line.startswith("VmHWM:")), None)
    peak_kb = hwm_kb if hwm_kb is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_rss_mb": peak_kb / 1024}))


def child_rss(args, which: str) -> float:
    cmd = [sys.executable, __file__, "--data", str(args.data), "--cases", str(args.cases), "--child", which]
    if args.chunk_voxels:
        cmd += ["--chunk-voxels", str(args.chunk_voxels)]
    if args.compile:
        cmd += ["--compile"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_rss_mb"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO / "bench_data" / "bench.h5")
    parser.add_argument("--cases", type=int, default=10**9, help="images segcal and the plain read use")
    parser.add_argument("--peer-cases", type=int, default=6, help="images for the comparison with the peers "
                        "(their in-memory copies: ~0.6 GB per 4 images for fiducio)")
    parser.add_argument("--chunk-voxels", type=int, default=None)
    parser.add_argument("--skip-peers", action="store_true")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                        help="compile segcal's per-voxel statistics (time includes compiling)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--child", choices=("segcal", "idle"), default=None)
    args = parser.parse_args()
    if args.child:
        return child(args)
    if not args.data.exists():
        sys.exit(f"{args.data} missing: run benchmarks/make_bench_data.py first")

    import torch

    report: dict = {"data": str(args.data), "threads": torch.get_num_threads(), "compile": args.compile,
                    "metrics": list(METRICS)}
    idle = child_rss(args, "idle")  # children first: before this process holds any data
    peak = child_rss(args, "segcal")
    report.update({"segcal_peak_rss_mb": peak, "idle_rss_mb": idle})
    print(f"segcal peak RSS {peak:.0f} MB (idle process {idle:.0f} MB)")
    plain_read(args.data, args.cases)  # warm the page cache
    report["plain_read_s"] = plain_read(args.data, args.cases)
    # Like the plain read (timed after an untimed one), segcal is timed warm: its first run in a process also
    # pays one-time costs (importing numba and loading its cached kernels, growing the heap to its working
    # set: ~1.3 s here), reported separately as segcal_first_run_s.
    report["segcal_first_run_s"], _ = segcal_evaluate(args.data, args.cases, args.chunk_voxels,
                                                      compile_stats=args.compile)
    runs = [segcal_evaluate(args.data, args.cases, args.chunk_voxels, compile_stats=args.compile)
            for _ in range(2)]
    report["segcal_s"], segcal_all = min(runs, key=lambda r: r[0])
    import h5py

    with h5py.File(args.data, "r") as f:
        shape = f["logits"].shape
    cases_used = min(args.cases, shape[0])
    voxels = cases_used * int(np.prod(shape[2:]))
    report.update({"cases": cases_used, "classes": shape[1], "voxels": voxels,
                   "segcal_mvox_s": voxels / report["segcal_s"] / 1e6,
                   "segcal_m_voxel_classes_s": voxels * shape[1] / report["segcal_s"] / 1e6})
    report["segcal_vs_plain_read"] = report["segcal_s"] / report["plain_read_s"]
    print(f"{cases_used} cases ({voxels / 1e6:.0f} M voxels x {shape[1]} classes): plain read "
          f"{report['plain_read_s']:.2f} s, segcal evaluate {report['segcal_s']:.2f} s "
          f"({report['segcal_mvox_s']:.1f} Mvox/s, {report['segcal_vs_plain_read']:.2f}x the read; "
          f"first run in the process {report['segcal_first_run_s']:.2f} s)")
    if not args.skip_peers:
        k = args.peer_cases
        seg_s, seg = segcal_evaluate(args.data, k, args.chunk_voxels, compile_stats=args.compile)
        logits16, labels = load_memory(args.data, k)
        tm_s, tm = torchmetrics_work(logits16, labels)
        fi_s, fi = fiducio_work(logits16, labels)
        del logits16, labels
        report["peers"] = {"cases": k, "segcal_s": seg_s, "torchmetrics_s": tm_s, "fiducio_s": fi_s,
                           "torchmetrics_over_segcal": tm_s / seg_s, "fiducio_over_segcal": fi_s / seg_s,
                           "ece": {"segcal": seg["ece"], "torchmetrics": tm["ece"], "fiducio": fi["ece"]},
                           "nll": {"segcal": seg["nll"], "torchmetrics": tm["nll"], "fiducio": fi["nll"]},
                           "brier": {"segcal": seg["brier"], "torchmetrics": tm["brier"], "fiducio": fi["brier"]},
                           "dice_max_abs_diff_torchmetrics": float(np.nanmax(np.abs(
                               np.array(seg["dice"], dtype=float) - np.array(tm["dice"], dtype=float))))}
        print(f"{k} cases: segcal {seg_s:.2f} s (reads the file), torchmetrics {tm_s:.2f} s "
              f"({tm_s / seg_s:.2f}x segcal), fiducio {fi_s:.2f} s ({fi_s / seg_s:.2f}x segcal), from memory")
        print(f"  ECE segcal {seg['ece']:.6f} torchmetrics {tm['ece']:.6f} fiducio {fi['ece']:.6f}; "
              f"NLL {seg['nll']:.6f} / {tm['nll']:.6f} / {fi['nll']:.6f}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
