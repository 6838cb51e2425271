"""The benchmark data writer and the streaming benchmark, run tiny: layout and consistency, not speed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import zarr

from segcal_cli import synthetic

REPO = Path(__file__).resolve().parents[1]


def test_make_bench_data_and_bench_stream(tmp_path):
    out = tmp_path / "bench"
    # 5 classes of 96 x 160 (chunks 256 clip to the image), 3 images (gb chosen for round(N) = 3).
    per_image = 5 * 96 * 160 * 2
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "make_bench_data.py"), "--out", str(out),
                    "--gb", str(3 * per_image / 1e9), "--classes", "5", "--height", "96", "--width", "160",
                    "--workers", "0", "--seed", "7"], check=True, capture_output=True, cwd=tmp_path)
    with h5py.File(out / "bench.h5", "r") as f:
        logits, labels = f["logits"][...], f["labels"][...]
        assert f["logits"].chunks == (1, 5, 96, 160) and f["labels"].chunks == (1, 96, 160)
        assert f["logits"].compression is None
        assert list(f["logits"].attrs["dimension_names"]) == ["case", "class", "y", "x"]
        generator = json.loads(f.attrs["generator"])
    assert logits.shape == (3, 5, 96, 160) and logits.dtype == np.float16
    assert labels.shape == (3, 96, 160) and labels.dtype == np.uint8
    assert generator["seeds"] == [7, 8, 9]
    root = zarr.open_group(out / "bench.zarr", mode="r")
    np.testing.assert_array_equal(root["logits"][...], logits)
    np.testing.assert_array_equal(root["labels"][...], labels)
    assert root["logits"].metadata.dimension_names == ("case", "class", "y", "x")
    # The images are the generator's (documented settings), rounded to float16.
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_bench_data", REPO / "benchmarks" / "make_bench_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    case = synthetic.make_case((96, 160), 5, 8, **module.generator_settings(5))
    np.testing.assert_array_equal(logits[1], case.logits.astype(np.float16))
    np.testing.assert_array_equal(labels[1], case.labels)

    result = tmp_path / "stream.json"
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_stream.py"), "--data-dir", str(out),
                    "--repeat", "1", "--no-rss", "--json", str(result)], check=True, capture_output=True,
                   cwd=tmp_path)
    figures = json.loads(result.read_text())
    for fmt in ("h5", "zarr"):
        row = figures["formats"][fmt]
        assert row["plain"]["voxels"] == row["segcal"]["voxels"] == row["segcal-raw"]["voxels"] == 3 * 96 * 160
        assert row["ratio"] > 0
