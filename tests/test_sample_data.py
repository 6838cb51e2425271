"""sample_data/: present, in the documented layout, and regenerated bit for bit by scripts/make_sample_data.py."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import zarr

from segcal_cli import synthetic

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "sample_data"
SCRIPT = REPO / "scripts" / "make_sample_data.py"
STREET_FILES = ("street_val.h5", "street_test.h5")
BRAIN_STORES = ("brain_val.zarr", "brain_test.zarr")


def _tree_hashes(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != "README.md"}


def test_files_exist_and_stay_small():
    for name in STREET_FILES + BRAIN_STORES + ("README.md", "SHA256SUMS"):
        assert (SAMPLE / name).exists(), name
    total = sum(p.stat().st_size for p in SAMPLE.rglob("*") if p.is_file())
    assert total < 6.5e6


def test_sha256sums_match_the_committed_files():
    listed = {}
    for line in (SAMPLE / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split("  ", 1)
        listed[name] = digest
    actual = _tree_hashes(SAMPLE)
    actual.pop("SHA256SUMS")
    assert listed == actual


def test_regenerated_bit_for_bit(tmp_path):
    subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path)], check=True, capture_output=True,
                   cwd=tmp_path)
    assert _tree_hashes(tmp_path) == _tree_hashes(SAMPLE)


@pytest.mark.parametrize("name", STREET_FILES)
def test_street_layout(name):
    with h5py.File(SAMPLE / name, "r") as f:
        logits, labels = f["logits"], f["labels"]
        n = logits.shape[0]
        assert logits.shape == (n, 8, 96, 128) and n == 8
        assert logits.dtype == np.float16 and labels.dtype == np.uint8
        assert labels.shape == (n, 96, 128)
        assert logits.chunks == (1, 8, 64, 64) and labels.chunks == (1, 64, 64)
        assert logits.compression == "gzip" and labels.compression == "gzip"
        assert list(logits.attrs["dimension_names"]) == ["case", "class", "y", "x"]
        assert list(labels.attrs["dimension_names"]) == ["case", "y", "x"]
        for obj in (logits, labels, f):
            assert list(obj.attrs["class_names"]) == list(synthetic.STREET_CLASSES)
            assert obj.attrs["ignore_index"] == 255
        assert logits.attrs["kind"] == "logits" and labels.attrs["kind"] == "labels"
        mis = json.loads(f.attrs["miscalibration"])
        assert mis["temperature"] == synthetic.STREET_MISCALIBRATION.temperature
        assert mis["offset_std"] == synthetic.STREET_MISCALIBRATION.offset_std
        seeds = [int(s) for s in f.attrs["seeds"]]
        y = labels[...]
        x = logits[...]
    assert np.all(np.isfinite(x))
    assert set(np.unique(y)) <= set(range(8)) | {255}
    assert np.all(y[:, -synthetic.STREET_IGNORE_BOTTOM_ROWS:] == 255)
    # The stored arrays are the generator's, rounded to float16.
    case = synthetic.make_street_case(seeds[1])
    np.testing.assert_array_equal(x[1], case.logits.astype(np.float16))
    np.testing.assert_array_equal(y[1], case.labels)


@pytest.mark.parametrize("name", BRAIN_STORES)
def test_brain_layout(name):
    root = zarr.open_group(SAMPLE / name, mode="r")
    assert root.metadata.zarr_format == 3
    assert list(root.attrs["class_names"]) == list(synthetic.BRAIN_CLASSES)
    assert root.attrs["ignore_index"] == 255
    assert root.attrs["miscalibration"]["temperature"] == synthetic.BRAIN_MISCALIBRATION.temperature
    groups = sorted(k for k, _ in root.groups())
    assert groups == [f"case_{i:03d}" for i in range(3)]
    shapes = set()
    for key in groups:
        logits, labels = root[f"{key}/logits"], root[f"{key}/labels"]
        assert logits.dtype == np.float16 and labels.dtype == np.uint8
        assert logits.shape[0] == 4 and logits.shape[1:] == labels.shape and len(labels.shape) == 3
        assert logits.chunks == (4, 16, 32, 32) and labels.chunks == (16, 32, 32)
        assert logits.metadata.dimension_names == ("class", "z", "y", "x")
        assert labels.metadata.dimension_names == ("z", "y", "x")
        for arr, kind in ((logits, "logits"), (labels, "labels")):
            assert arr.attrs["kind"] == kind
            assert list(arr.attrs["class_names"]) == list(synthetic.BRAIN_CLASSES)
            assert arr.attrs["ignore_index"] == 255
        shapes.add(labels.shape)
        y = labels[...]
        assert set(np.unique(y)) <= {0, 1, 2, 3}
    assert len(shapes) == 3  # every case has its own shape
    seed = root["case_000"].attrs["seed"]
    case = synthetic.make_brain_case(seed, root["case_000/labels"].shape)
    np.testing.assert_array_equal(root["case_000/logits"][...], case.logits.astype(np.float16))
    np.testing.assert_array_equal(root["case_000/labels"][...], case.labels)


def test_sample_data_is_miscalibrated_as_documented():
    """Stored (float16) logits against the regenerated true posterior: overconfident, ECE well above 0."""
    with h5py.File(SAMPLE / "street_val.h5", "r") as f:
        x = f["logits"][...].astype(np.float32)
        y = f["labels"][...]
        seeds = [int(s) for s in f.attrs["seeds"]]
    posterior = np.stack([synthetic.make_street_case(s).posterior for s in seeds])
    m = synthetic.implied_metrics(np.moveaxis(x, 1, 0), np.moveaxis(posterior, 1, 0), valid=y != 255)
    assert m["ece"] > 0.05 and m["confidence"] > m["accuracy"] + 0.05
    truth = synthetic.implied_metrics(np.log(np.moveaxis(posterior, 1, 0)), np.moveaxis(posterior, 1, 0),
                                      valid=y != 255)
    assert truth["ece"] < 1e-6


@pytest.mark.parametrize("name,cases,classes", [("street_val.h5", 8, 8), ("brain_test.zarr", 3, 4)])
def test_sample_data_is_valid_segcal_data(name, cases, classes):
    from segcal_cli.io import DataOptions, open_dataset

    with open_dataset([str(SAMPLE / name)], DataOptions(device="cpu"), require_labels=True) as ds:
        assert ds.num_classes == classes and len(ds.cases) == cases
        seen = sum(int(block.valid.shape[0]) for block in ds.stream())
        assert seen == ds.total_voxels
