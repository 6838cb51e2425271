"""Calibrator families: forward maps as theory.md defines them, declared properties, registry, artifact."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from segcal_cli.calibrators import METHODS, get_method, load_artifact, save_artifact
from segcal_cli.errors import InputError

ALL = list(METHODS)
TI_FAMILIES = [n for n, c in METHODS.items() if c.properties.translation_invariant]


def _probs(g):
    return torch.softmax(g, dim=0)


def _random_logits(C, n, seed=0, scale=3.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(C, n, generator=g, dtype=torch.float64)).to(dtype)


# --------------------------------------------------------------------------- definitions (theory.md §3-4)


def _reference(name, params, z):
    """Straightforward per-voxel reference implementations of theory.md, in float64."""
    C, n = z.shape
    ell = z - torch.logsumexp(z, 0, keepdim=True)
    if name == "ts":
        return z / params["temperature"]
    if name == "vs":
        return params["weight"][:, None] * z + params["bias"][:, None]
    if name == "vs-ti":
        return params["weight"][:, None] * ell + params["bias"][:, None]
    if name in ("ms", "ms-ti"):
        return params["weight"] @ z + params["bias"][:, None]
    if name == "dc":
        return params["weight"] @ ell + params["bias"][:, None]
    if name == "ets":
        T, w = params["temperature"], params["weights"]
        p = w[0] * torch.softmax(z / T, 0) + w[1] * torch.softmax(z, 0) + w[2] / C
        return p.log()
    out = torch.empty_like(z)
    for i in range(n):
        zi, li = z[:, i], ell[:, i]
        k = int(torch.argmax(zi))
        if name == "cdc":
            out[:, i] = params["weight"][k] @ li + params["bias"][k]
        elif name == "cms-ap":
            comp = [j for j in range(C) if j != k]
            m = li[k] - li[comp]
            m2 = params["weight"][k] @ m + params["bias"][k]
            out[k, i] = 0
            out[comp, i] = -m2
        elif name == "cms-op":
            order = sorted(range(C), key=lambda j: (-float(li[j]), j))
            s = li[order]
            d = s[:-1] - s[1:]
            d2 = params["weight"][k] @ d + params["bias"][k]
            h = torch.cat([torch.zeros(1, dtype=z.dtype), -torch.cumsum(d2, 0)])
            out[order, i] = h
    return out


@pytest.mark.parametrize("name", ALL)
def test_forward_matches_theory_definition(name):
    cls = get_method(name)
    cal = cls.random(4, torch.Generator().manual_seed(3))
    z = _random_logits(4, 300, seed=1)
    got = _probs(cal.forward(z))
    want = _probs(_reference(name, cal.parameters(), z))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ALL)
def test_identity_is_identity_and_dtypes_follow_input(name):
    cls = get_method(name)
    z = _random_logits(5, 200, seed=2)
    cal = cls.identity(5)
    torch.testing.assert_close(_probs(cal.forward(z)), _probs(z), rtol=0, atol=1e-12)
    assert cal.forward(z).dtype == torch.float64
    assert cal.forward(z.float()).dtype == torch.float32
    assert cal.forward(z.half()).dtype == torch.float32
    # classes-first with trailing spatial axes works too
    out = cal.forward(z.reshape(5, 10, 20))
    assert out.shape == (5, 10, 20)


@pytest.mark.parametrize("name", ALL)
def test_parameters_match_declared_count_and_prepared_path(name):
    cls = get_method(name)
    C = 4
    cal = cls.random(C, torch.Generator().manual_seed(5))
    params = cal.parameters()
    assert sum(v.numel() for v in params.values()) == cls.num_parameters(C)
    assert all(v.dtype == torch.float64 for v in params.values())
    # the fitting path (prepare + prepared_logits) gives the same NLL as forward
    z = _random_logits(C, 500, seed=6)
    y = torch.randint(0, C, (500,), generator=torch.Generator().manual_seed(7))
    feats, labels = cls.prepare(z, y)
    g = cls.prepared_logits(params, feats)
    nll_prepared = (torch.logsumexp(g, 0) - g.gather(0, labels[None])[0]).mean()
    out = cal.forward(z)
    nll_forward = (torch.logsumexp(out, 0) - out.gather(0, y[None])[0]).mean()
    assert abs(float(nll_prepared - nll_forward)) < 1e-12


def test_registry_and_properties():
    assert list(METHODS) == ["ts", "vs", "vs-ti", "ms", "ms-ti", "dc", "ets", "cdc", "cms-ap", "cms-op"]
    expected = {  # (TI, argmax, order), theory.md §3 table
        "ts": (1, 1, 1), "vs": (0, 0, 0), "vs-ti": (1, 0, 0), "ms": (0, 0, 0), "ms-ti": (1, 0, 0),
        "dc": (1, 0, 0), "ets": (1, 1, 1), "cdc": (1, 0, 0), "cms-ap": (1, 1, 0), "cms-op": (1, 1, 1),
    }
    for name, (ti, am, order) in expected.items():
        p = get_method(name).properties
        assert (p.translation_invariant, p.argmax_preserving, p.order_preserving) == (ti, am, order)
    counts = {n: get_method(n).num_parameters(19) for n in METHODS}
    assert counts["ts"] == 1 and counts["vs"] == 38 and counts["ms"] == 380 and counts["ets"] == 4
    assert counts["cdc"] == 19 * 19 * 19 + 19 * 19
    assert counts["cms-ap"] == counts["cms-op"] == 19 * 18 * 18 + 19 * 18
    with pytest.raises(InputError, match="unknown method 'tz'.*ts, vs"):
        get_method("tz")


# --------------------------------------------------------------------------- translation invariance


@pytest.mark.parametrize("name", ALL)
def test_translation_invariance_matches_declaration(name):
    cls = get_method(name)
    cal = cls.random(5, torch.Generator().manual_seed(11))
    z = _random_logits(5, 400, seed=12)
    offset = 10.0 * torch.randn(1, 400, generator=torch.Generator().manual_seed(13), dtype=torch.float64)
    diff = (_probs(cal.forward(z + offset)) - _probs(cal.forward(z))).abs().max().item()
    global_shift = (_probs(cal.forward(z + 1e3)) - _probs(cal.forward(z))).abs().max().item()
    if cls.properties.translation_invariant:
        assert diff < 1e-12 and global_shift < 1e-10
    else:
        assert diff > 1e-2 and global_shift > 1e-2


# --------------------------------------------------------------------------- decision preservation

C_MAX = 6


@st.composite
def _logit_blocks(draw):
    C = draw(st.integers(2, C_MAX))
    n = draw(st.integers(1, 12))
    magnitude = draw(st.sampled_from([1e-3, 1.0, 30.0, 1e3, 1e4]))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    z = magnitude * torch.randn(C, n, generator=g, dtype=torch.float64)
    if draw(st.booleans()):  # near-ties: competitors a few ulps / tiny gaps below the top
        top = z.max(0).values
        eps = draw(st.sampled_from([0.0, 1e-7, 1e-4]))
        z[: C // 2 + 1] = top + eps * torch.rand(C // 2 + 1, n, generator=g, dtype=torch.float64)
    dtype = draw(st.sampled_from([torch.float16, torch.float32, torch.float64]))
    if dtype == torch.float16:
        z = z.clamp(-6e4, 6e4)
    return C, z.to(dtype), seed


def _strict_pairs(z):
    """pairs (i, j, voxel) with z_i > z_j strictly, as a boolean (C, C, n) tensor."""
    return z[:, None, :] > z[None, :, :]


@pytest.mark.parametrize("name", [n for n, c in METHODS.items() if c.properties.order_preserving])
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(block=_logit_blocks())
def test_order_never_reversed(name, block):
    C, z, seed = block
    cal = get_method(name).random(C, torch.Generator().manual_seed(seed))
    zin = z.to(torch.float32) if z.dtype == torch.float16 else z
    out = cal.forward(z)
    assert torch.isfinite(out).all()
    # z_i > z_j  =>  g_i >= g_j (float rounding may create a tie, never an inversion)
    inverted = _strict_pairs(zin) & (out[:, None, :] < out[None, :, :])
    assert not bool(inverted.any())
    # the input's argmax is still a maximiser of the output
    top = zin.max(0).indices
    assert bool((out.gather(0, top[None])[0] >= out.max(0).values).all())


@pytest.mark.parametrize("name", ["cms-ap", "cms-op"])
@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(block=_logit_blocks())
def test_class_conditional_argmax_exactly_kept(name, block):
    C, z, seed = block
    cal = get_method(name).random(C, torch.Generator().manual_seed(seed))
    zin = z.to(torch.float32) if z.dtype == torch.float16 else z
    out = cal.forward(z)
    assert torch.equal(out.max(0).indices, zin.max(0).indices)


def test_ms_and_cdc_can_flip_the_argmax():
    z = _random_logits(4, 2000, seed=3)
    for name in ("ms", "cdc"):
        cal = get_method(name).random(4, torch.Generator().manual_seed(4))
        assert bool((cal.forward(z).max(0).indices != z.max(0).indices).any())


# --------------------------------------------------------------------------- from_parameters validation


@pytest.mark.parametrize(
    "name, params, message",
    [
        ("ts", {"temperature": -1.0}, "temperature must be > 0"),
        ("ts", {"temperature": 0.0}, "temperature must be > 0"),
        ("ts", {"temperature": float("nan")}, "NaN or infinite"),
        ("ts", {"temp": 1.0}, "missing temperature"),
        ("vs", {"weight": [1.0, 1.0], "bias": [0.0, 0.0, 0.0]}, r"shape \(2,\), expected \(3,\)"),
        ("ets", {"temperature": 1.0, "weights": [0.5, 0.6, -0.1]}, "weights must be >= 0"),
        ("ets", {"temperature": 1.0, "weights": [0.5, 0.6, 0.1]}, "sum to 1"),
        ("ms-ti", {"weight": [[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 1.0]], "bias": [0, 0, 0]}, "same value"),
        ("cms-ap", {"weight": [[[1.0, -0.1], [0.0, 1.0]]] * 3, "bias": [[0.0, 0.0]] * 3}, "must be >= 0"),
        ("cms-op", {"weight": [[[1.0, 0.0], [0.0, 1.0]]] * 3, "bias": [[0.0, -1e-3]] * 3}, "must be >= 0"),
        ("dc", {"weight": [[1, 0, 0], [0, 1]], "bias": [0, 0, 0]}, "not a numeric array"),
    ],
)
def test_from_parameters_rejects(name, params, message):
    with pytest.raises(InputError, match=message):
        get_method(name).from_parameters(3, params)


# --------------------------------------------------------------------------- artifact


@pytest.mark.parametrize("suffix", [".json", ".pt"])
@pytest.mark.parametrize("name", ALL)
def test_artifact_round_trip_is_bit_identical(tmp_path, name, suffix):
    cal = get_method(name).random(4, torch.Generator().manual_seed(21))
    path = tmp_path / f"cal{suffix}"
    save_artifact(cal, path, {"seed": 0, "nll_before": 1.5, "converged": True})
    loaded, info = load_artifact(path, expect_classes=4)
    assert info["method"] == name and info["num_classes"] == 4 and info["fit"]["seed"] == 0
    for key, value in cal.parameters().items():
        assert torch.equal(loaded.parameters()[key], value)
    z = _random_logits(4, 256, seed=22, dtype=torch.float32)
    assert torch.equal(loaded.forward(z), cal.forward(z))
    assert not list(tmp_path.glob(".*tmp"))  # no temporary left behind


def test_json_artifact_layout(tmp_path):
    cal = get_method("ts").from_parameters(19, {"temperature": 1.734})
    save_artifact(cal, tmp_path / "t.json", {"cases": 50})
    doc = json.loads((tmp_path / "t.json").read_text())
    assert doc["format"] == "segcal.calibrator" and doc["schema_version"] == 1
    assert doc["method"] == "ts" and doc["num_classes"] == 19
    assert doc["properties"] == {"translation_invariant": True, "argmax_preserving": True, "order_preserving": True}
    assert doc["parameters"] == {"temperature": 1.734}
    assert doc["fit"] == {"cases": 50}


def _write(tmp_path, doc, name="bad.json"):
    path = tmp_path / name
    path.write_text(json.dumps(doc) if not isinstance(doc, str) else doc)
    return path


def _ts_doc(**over):
    doc = {"format": "segcal.calibrator", "schema_version": 1, "method": "ts", "num_classes": 3,
           "parameters": {"temperature": 2.0}, "fit": {}}
    doc.update(over)
    return doc


@pytest.mark.parametrize(
    "doc, message",
    [
        (_ts_doc(parameters={"temperature": -2.0}), "temperature must be > 0"),
        ('{"format": "segcal.calibrator", "schema_version": 1, "method": "ts", "num_classes": 3, '
         '"parameters": {"temperature": NaN}}', "NaN or infinite"),
        (_ts_doc(schema_version=2), "unknown calibrator schema version 2"),
        (_ts_doc(method="platt"), "unknown method 'platt'"),
        (_ts_doc(format="something"), "not a segcal calibrator"),
        (_ts_doc(properties={"translation_invariant": False}), "do not match"),
        ('{"format": "segcal.calibrator", "schema_ver', "truncated or corrupt"),
        ("", "empty"),
    ],
)
def test_load_rejects_bad_artifacts(tmp_path, doc, message):
    with pytest.raises(InputError, match=message):
        load_artifact(_write(tmp_path, doc))


def test_load_rejects_wrong_class_count(tmp_path):
    path = _write(tmp_path, _ts_doc())
    with pytest.raises(InputError, match="for 3 classes but the data has 5"):
        load_artifact(path, expect_classes=5)


def test_pt_with_pickled_objects_is_refused_and_truncated_pt_too(tmp_path):
    evil = tmp_path / "evil.pt"
    torch.save({"format": "segcal.calibrator", "payload": _Pickled()}, evil)
    with pytest.raises(InputError, match="refused"):
        load_artifact(evil)
    good = tmp_path / "good.pt"
    save_artifact(get_method("ts").identity(3), good)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[:100])
    with pytest.raises(InputError, match="truncated or corrupt"):
        load_artifact(cut)


class _Pickled:
    pass


def test_save_refuses_unknown_suffix(tmp_path):
    with pytest.raises(InputError, match=".json or .pt"):
        save_artifact(get_method("ts").identity(3), tmp_path / "cal.yaml")
    assert not list(tmp_path.iterdir())


# --------------------------------------------------------------------------- segcal methods


def test_methods_command_lists_every_family(tmp_path):
    out = tmp_path / "methods.json"
    run = subprocess.run([sys.executable, "-m", "segcal_cli", "methods", "--classes", "4", "--json", str(out)],
                         capture_output=True, text=True, check=True)
    doc = json.loads(out.read_text())
    assert doc["num_classes"] == 4
    rows = {r["name"]: r for r in doc["methods"]}
    assert list(rows) == ALL
    assert rows["cms-ap"]["num_parameters"] == 4 * 9 + 4 * 3
    assert rows["vs"]["translation_invariant"] is False and rows["cms-ap"]["argmax_preserving"] is True
    for name in ALL:  # the human table lists every family too
        assert name in run.stdout
    bad = subprocess.run([sys.executable, "-m", "segcal_cli", "methods", "--classes", "1"], capture_output=True, text=True)
    assert bad.returncode == 2 and "at least 2" in bad.stderr
