"""Bad data through the real `segcal` program: exit code 2, one line naming file and case, no traceback."""

from __future__ import annotations

import subprocess
import sys

import h5py
import numpy as np


def _h5(path, **arrays):
    with h5py.File(path, "w") as f:
        for key, value in arrays.items():
            f.create_dataset(key, data=value)
    return path


def test_bad_data_exits_2_with_one_line_and_writes_nothing(tmp_path):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 3, 5, 6)).astype(np.float32)
    labels = rng.integers(0, 3, size=(2, 5, 6)).astype(np.uint8)
    nan = logits.copy()
    nan[1, 0, 0, :4] = np.nan
    bad_labels = labels.copy()
    bad_labels[1, 2, 2] = 7
    corrupt = tmp_path / "corrupt.h5"
    corrupt.write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(300))
    (tmp_path / "notes.txt").write_text("not data")
    cases = [
        ([str(tmp_path / "absent.h5")], "absent.h5: no such file"),
        ([str(tmp_path / "notes.txt")], "unsupported file type"),
        ([str(_h5(tmp_path / "nolabels.h5", logits=logits))], "nolabels.h5 [case nolabels]: evaluate needs labels: no 'labels' array"),
        ([str(_h5(tmp_path / "nan.h5", logits=nan, labels=labels))], "nan.h5 [case nan[1]]: logits contain 4 NaN"),
        ([str(_h5(tmp_path / "lab.h5", logits=logits, labels=bad_labels))], "lab.h5 [case lab[1]]: 1 labels outside"),
        ([str(corrupt)], "corrupt.h5: cannot open"),
    ]
    for args, expected in cases:
        report = tmp_path / "report.json"
        run = subprocess.run([sys.executable, "-m", "segcal_cli", "evaluate", *args, "--json", str(report),
                              "--quiet"], capture_output=True, text=True)
        assert run.returncode == 2, (args, run.stderr)
        lines = run.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("segcal: error: "), run.stderr
        assert expected in lines[0], (expected, lines[0])
        assert "Traceback" not in run.stderr
        assert not report.exists()
