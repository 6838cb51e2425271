"""The numerics of `segcal check-invariance`: measure translation invariance and decision preservation.

Everything here takes a plain callable `forward: (C, n) float64 logits -> (C, n) float64 calibrated logits`
(a calibrator's `forward`, or a lambda in tests) and the properties it *declares*, and returns plain
dicts (JSON-ready) with what was *measured* and the verdicts. theory.md §2 (TI), §3 (which family is what),
§4 "Strictness" (what a preservation claim is about).

Measurement rules (stated in docs/invariance.md and in every JSON report):

* Everything is evaluated in float64. Stored logits are float32 and are only widened, so the audit sees the
  user's exact numbers; float32 round-off at a 1e3 shift (~6e-5 absolute on the logits) would otherwise fail
  every TI calibrator.
* Translation invariance: calibrated probabilities `S(g(z + c))` against `S(g(z))` for global shifts
  `c` in ±1e-3, ±1, ±10, ±100, ±1e3, for a random per-voxel offset `c(x) ~ N(0, 10²)`, and for the
  `log S(z)` representation. Verdict: TI holds when the largest absolute probability difference of all
  of them is at most `TI_TOLERANCE` (1e-9). In float64 a TI calibrator stays around 1e-12 on logits of
  magnitude 1e4 shifted by 1e3 (a float64 ulp at 1.1e4 is 1.8e-12); a shift-sensitive one moves by about
  `shift × (spread of its weights)`, i.e. far above 1e-9 already at a 1e-3 shift.
* Decisions, exact (no tolerance) in float64, on voxels where the input ordering is resolved:
  - argmax flip: the input's top class is unique and some other class is *strictly* above it after
    calibration (an exact input tie has no decision to preserve and is left out);
  - order change: the input ranking is strict (all classes distinct) and some pair is *strictly* inverted
    after calibration. Ties created by calibration (e.g. ETS where the tail probabilities underflow to the
    uniform floor) keep the order weakly; they are counted separately (`*_ties_created`), not as changes.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence

import torch

from segcal_cli.errors import InputError

Forward = Callable[[torch.Tensor], torch.Tensor]

PROPERTY_NAMES = ("translation_invariant", "argmax_preserving", "order_preserving")
# --require spelling -> property name
REQUIRE_NAMES = {"ti": "translation_invariant", "argmax": "argmax_preserving", "order": "order_preserving"}
SHORT_NAMES = {v: k for k, v in REQUIRE_NAMES.items()}

TI_TOLERANCE = 1e-9
GLOBAL_SHIFTS = (1e-3, -1e-3, 1.0, -1.0, 10.0, -10.0, 100.0, -100.0, 1e3, -1e3)
OFFSET_STD = 10.0
DRIFT_SHIFTS = (-1e3, -100.0, -10.0, -1.0, 0.0, 1.0, 10.0, 100.0, 1e3)
DRIFT_VOXELS = 4
# Adversarial logits: magnitudes log-uniform up to 1e4, near-tie gaps log-uniform in [1e-6, 1e-3].
ADVERSARIAL_MAX_MAGNITUDE = 1e4
NEAR_TIE_GAPS = (1e-6, 1e-3)
# Voxels per forward call: bounds the memory of the class-conditional families (C experts).
FORWARD_CHUNK = 1 << 15


# ----------------------------------------------------------------------------------------------- inputs
def random_logits(num_classes: int, num_voxels: int, generator: torch.Generator) -> torch.Tensor:
    """Plausible network logits, float64 (C, n): per-voxel confidence scale log-uniform in [0.3, 20]
    (uncertain to very confident voxels) plus a per-voxel offset N(0, 5²) as real logits carry."""
    scale = torch.exp(torch.empty(num_voxels, dtype=torch.float64).uniform_(math.log(0.3), math.log(20.0), generator=generator))
    z = torch.randn(num_classes, num_voxels, dtype=torch.float64, generator=generator) * scale
    return z + 5.0 * torch.randn(num_voxels, dtype=torch.float64, generator=generator)


def adversarial_logits(num_classes: int, num_voxels: int, generator: torch.Generator) -> torch.Tensor:
    """Logits that stress decision guarantees, float64 (C, n), in four equal parts:

    1. wide magnitudes: N(0, 1) scaled by 10^U(-2, 4), so logits up to ~1e4 (before the calibrator);
    2. top-2 near-ties: the runner-up sits a gap in [1e-6, 1e-3] (log-uniform) below the top class;
    3. full-ranking near-ties: every consecutive sorted gap in [1e-6, 1e-3], random class order;
    4. float16-representable copies of parts 1-3 (as stored float16 data arrives): rounding creates exact
       ties (left out of the decision counts) and gaps of one float16 ulp.
    Every part also carries a per-voxel offset of up to ±1e3.
    """
    C, n = num_classes, num_voxels
    quarter = max(1, n // 4)
    g = generator

    def log_uniform(size, lo, hi):
        return torch.exp(torch.empty(size, dtype=torch.float64).uniform_(math.log(lo), math.log(hi), generator=g))

    wide = torch.randn(C, quarter, dtype=torch.float64, generator=g) * log_uniform(quarter, 1e-2, ADVERSARIAL_MAX_MAGNITUDE)

    top2 = torch.randn(C, quarter, dtype=torch.float64, generator=g) * log_uniform(quarter, 0.5, 10.0)
    ordered = top2.sort(0, descending=True)
    first, second = ordered.indices[0], ordered.indices[1]
    cols = torch.arange(quarter)
    top2[second, cols] = top2[first, cols] - log_uniform(quarter, *NEAR_TIE_GAPS)

    gaps = log_uniform((C - 1, quarter), *NEAR_TIE_GAPS)
    descending = torch.cat([torch.zeros(1, quarter, dtype=torch.float64), -gaps.cumsum(0)], 0)
    perm = torch.argsort(torch.rand(C, quarter, generator=g), dim=0)
    ranking = torch.empty_like(descending).scatter_(0, perm, descending)
    ranking = ranking + log_uniform(quarter, 0.1, 100.0) * torch.sign(torch.randn(quarter, dtype=torch.float64, generator=g))

    parts = torch.cat([wide, top2, ranking], 1)
    parts = parts + torch.empty(parts.shape[1], dtype=torch.float64).uniform_(-1e3, 1e3, generator=g)
    remaining = max(0, n - parts.shape[1])
    pick = torch.randint(0, parts.shape[1], (remaining,), generator=g)
    half = parts[:, pick].clamp(-6e4, 6e4).to(torch.float16).to(torch.float64)
    return torch.cat([parts, half], 1)[:, :n].contiguous()


def sample_voxels(dataset, num_voxels: int, seed: int, progress: Optional[Callable[[int], None]] = None) -> torch.Tensor:
    """A reproducible uniform sample of `num_voxels` valid voxels from a dataset, in one streaming pass.

    The same scheme as `segcal fit --max-voxels` (segcal_cli.fitting.sampling): each voxel's key is a hash of
    (seed, case index, flat position in its case) and the sample is the k smallest keys, in key order. It
    does not depend on the block size, the device or the read order. Valid voxels only (mask, ignore label),
    as decision claims are about them (theory.md §4). Returns float64 logits (C, k) on the CPU; k <
    num_voxels only when the data holds fewer valid voxels.
    """
    from segcal_cli.fitting.sampling import BottomKSampler, keyed_valid_voxels

    sampler = BottomKSampler(num_voxels)
    blocks = dataset.stream(with_labels=dataset.has_labels)
    for _, logits, _, keys in keyed_valid_voxels(dataset, blocks, seed, progress):
        sampler.add(logits, torch.zeros(logits.shape[1], dtype=torch.int64, device=logits.device), keys)
    logits, _, _ = sampler.result(dataset.num_classes)
    if logits.shape[1] == 0:
        raise InputError("no valid voxels to audit (every voxel is masked or ignored)")
    return logits.cpu().to(torch.float64)


# ----------------------------------------------------------------------------------------------- measures
def calibrated_logits(forward: Forward, logits: torch.Tensor) -> torch.Tensor:
    """forward() over voxel chunks; insists on float64 output so the audit measures the calibrator, not
    float32 round-off."""
    outs = []
    for start in range(0, logits.shape[1], FORWARD_CHUNK):
        out = forward(logits[:, start:start + FORWARD_CHUNK])
        if out.dtype != torch.float64:
            raise TypeError(f"forward returned {out.dtype} for float64 input; the audit needs float64 output")
        outs.append(out)
    if len(outs) == 1:
        return outs[0]
    return torch.cat(outs, 1) if outs else logits.new_empty(logits.shape)


def probabilities(forward: Forward, logits: torch.Tensor) -> torch.Tensor:
    return torch.softmax(calibrated_logits(forward, logits), dim=0)


def _difference(reference: torch.Tensor, other: torch.Tensor, tolerance: float) -> dict:
    """Absolute probability differences; NaN (a calibrator that breaks down) counts as infinitely wrong."""
    diff = (other - reference).abs_()
    per_voxel = diff.amax(0)  # NaN propagates through amax / mean; mapped to inf below
    largest, mean = float(per_voxel.max()), float(diff.mean())
    return {
        "max_abs_diff": math.inf if math.isnan(largest) else largest,
        "mean_abs_diff": math.inf if math.isnan(mean) else mean,
        "voxels_over_tolerance": int((~(per_voxel <= tolerance)).sum()),
    }


def translation_invariance(forward: Forward, logits: torch.Tensor, generator: torch.Generator, *,
                           shifts: Sequence[float] = GLOBAL_SHIFTS, offset_std: float = OFFSET_STD,
                           tolerance: float = TI_TOLERANCE, reference: Optional[torch.Tensor] = None) -> dict:
    """Calibrated probabilities under every representation of the same predictions, against the plain one."""
    logits = logits.to(torch.float64)
    if reference is None:
        reference = probabilities(forward, logits)
    tests: List[dict] = []
    for shift in shifts:
        tests.append({"kind": "global_shift", "shift": float(shift),
                      **_difference(reference, probabilities(forward, logits + shift), tolerance)})
    offsets = offset_std * torch.randn(logits.shape[1], dtype=torch.float64, generator=generator).to(logits.device)
    tests.append({"kind": "per_voxel_offset", "offset_std": float(offset_std),
                  **_difference(reference, probabilities(forward, logits + offsets), tolerance)})
    log_probs = torch.log_softmax(logits, dim=0)
    tests.append({"kind": "log_softmax", **_difference(reference, probabilities(forward, log_probs), tolerance)})
    return _summarise_ti(tests, logits.shape[1], tolerance)


def _summarise_ti(tests: List[dict], voxels: int, tolerance: float) -> dict:
    worst = max(tests, key=lambda t: t["max_abs_diff"])
    max_abs = worst["max_abs_diff"]
    return {
        "voxels": voxels,
        "tolerance": tolerance,
        "max_abs_diff": max_abs,
        "mean_abs_diff": max(t["mean_abs_diff"] for t in tests),
        "worst_test": _test_label(worst),
        "holds": bool(max_abs <= tolerance),
        "tests": tests,
    }


def _test_label(test: dict) -> str:
    if test["kind"] == "global_shift":
        return f"shift {test['shift']:+g}"
    if test["kind"] == "per_voxel_offset":
        return f"per-voxel offset (std {test['offset_std']:g})"
    return "log S(z) input"


def decision_preservation(logits: torch.Tensor, calibrated: torch.Tensor) -> dict:
    """Argmax flips and order inversions of calibrated logits against the input (see module docstring)."""
    logits = logits.to(torch.float64)
    num_classes, n = logits.shape
    ordered = logits.sort(0, descending=True)
    top = ordered.indices[0]
    unique_top = ordered.values[0] > ordered.values[1]
    strict_order = (ordered.values[:-1] > ordered.values[1:]).all(0)

    at_top = calibrated.gather(0, top[None]).squeeze(0)
    others = calibrated.clone()
    others.scatter_(0, top[None], -math.inf)
    best_other = others.max(0).values
    # `not (top >= best other)` so a NaN output counts as a flip
    flipped = ~(at_top >= best_other) & unique_top
    top_tie = (at_top == best_other) & unique_top

    along = calibrated.gather(0, ordered.indices)
    steps = along[:-1] - along[1:]
    inverted = (~(steps >= 0)).any(0) & strict_order
    tied = (steps == 0).any(0) & strict_order & ~inverted

    decisive, strict = int(unique_top.sum()), int(strict_order.sum())
    return {
        "voxels": n,
        "argmax_voxels": decisive,
        "flips": int(flipped.sum()),
        "flip_rate": _rate(int(flipped.sum()), decisive),
        "argmax_ties_created": int(top_tie.sum()),
        "order_voxels": strict,
        "order_changes": int(inverted.sum()),
        "order_change_rate": _rate(int(inverted.sum()), strict),
        "order_ties_created": int(tied.sum()),
    }


def _rate(count: int, total: int) -> Optional[float]:
    return count / total if total else None


def drift(forward: Forward, logits: torch.Tensor, *, shifts: Sequence[float] = DRIFT_SHIFTS,
          max_voxels: int = DRIFT_VOXELS) -> dict:
    """The calibrated probability of each chosen voxel's (unshifted) calibrated top class as the shift grows.

    Voxels: the first voxel of each distinct input top class, in sample order, up to `max_voxels`, so the
    rows show different classes. A TI calibrator gives flat rows; vs / ms collapse onto one class
    (theory.md §3): rows go to 0 or 1 and the argmax becomes the same class everywhere.
    """
    logits = logits.to(torch.float64)
    top = logits.argmax(0).tolist()
    chosen, seen = [], set()
    for index, cls in enumerate(top):
        if cls not in seen:
            seen.add(cls)
            chosen.append(index)
            if len(chosen) == max_voxels:
                break
    if not chosen:
        return {"shifts": [float(s) for s in shifts], "voxels": []}
    picked = logits[:, chosen]
    base = probabilities(forward, picked)
    classes = base.argmax(0)
    rows = [{"sample_index": int(i), "input_top_class": int(top[i]), "class": int(classes[j]),
             "probability": [], "argmax": []} for j, i in enumerate(chosen)]
    for shift in shifts:
        probs = probabilities(forward, picked + shift)
        winners = probs.argmax(0)
        for j, row in enumerate(rows):
            row["probability"].append(float(probs[row["class"], j]))
            row["argmax"].append(int(winners[j]))
    spread = max((max(r["probability"]) - min(r["probability"]) for r in rows), default=0.0)
    return {"shifts": [float(s) for s in shifts], "voxels": rows, "max_change": spread}


# ----------------------------------------------------------------------------------------------- audits
def audit(forward: Forward, sets: Mapping[str, torch.Tensor], declared: Optional[Mapping[str, bool]], *,
          seed: int = 0, tolerance: float = TI_TOLERANCE, drift_set: Optional[str] = None) -> dict:
    """Measure TI and decision preservation of one calibrator on named voxel sets; compare with `declared`.

    `sets` maps a name ("data", "random", "adversarial") to float64 logits (C, n). The result holds, per
    set, the TI tests and the decision counts, the measured properties (holding on every set), the drift
    of a few voxels of `drift_set` (default: the first set), and one verdict row per property.
    """
    with _one_cpu_thread():
        return _audit(forward, sets, declared, seed=seed, tolerance=tolerance, drift_set=drift_set)


@contextlib.contextmanager
def _one_cpu_thread():
    """Audit tensors are small (C x 1e4..1e5); on them torch's intra-op threads cost more than they save,
    and far more on a busy machine (measured on 2 loaded cores: --all-methods 2.5 s with one thread,
    64 s with two). Restores the caller's setting."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _audit(forward: Forward, sets: Mapping[str, torch.Tensor], declared: Optional[Mapping[str, bool]], *,
           seed: int, tolerance: float, drift_set: Optional[str]) -> dict:
    generator = torch.Generator().manual_seed(seed)
    per_set_ti: Dict[str, dict] = {}
    per_set_decisions: Dict[str, dict] = {}
    for name, logits in sets.items():
        logits = logits.to(torch.float64)
        calibrated = calibrated_logits(forward, logits)
        reference = torch.softmax(calibrated, dim=0)
        per_set_ti[name] = translation_invariance(forward, logits, generator, tolerance=tolerance, reference=reference)
        per_set_decisions[name] = decision_preservation(logits, calibrated)
    drift_name = drift_set or next(iter(sets))
    result = {
        "translation_invariance": _ti_overall(per_set_ti, tolerance),
        "decisions": _decisions_overall(per_set_decisions),
        "drift": drift(forward, sets[drift_name]),
    }
    result["drift"]["set"] = drift_name
    result["measured"] = measured_properties(result)
    result["declared"] = dict(declared) if declared is not None else None
    return result


def _ti_overall(per_set: Dict[str, dict], tolerance: float) -> dict:
    worst_set = max(per_set, key=lambda k: per_set[k]["max_abs_diff"])
    return {
        "tolerance": tolerance,
        "max_abs_diff": per_set[worst_set]["max_abs_diff"],
        "mean_abs_diff": max(v["mean_abs_diff"] for v in per_set.values()),
        "worst": f"{worst_set}: {per_set[worst_set]['worst_test']}",
        "holds": all(v["holds"] for v in per_set.values()),
        "sets": per_set,
    }


_COUNT_KEYS = ("voxels", "argmax_voxels", "flips", "argmax_ties_created", "order_voxels", "order_changes",
               "order_ties_created")


def _decisions_overall(per_set: Dict[str, dict]) -> dict:
    total = {key: sum(v[key] for v in per_set.values()) for key in _COUNT_KEYS}
    total["flip_rate"] = _rate(total["flips"], total["argmax_voxels"])
    total["order_change_rate"] = _rate(total["order_changes"], total["order_voxels"])
    return {**total, "argmax_holds": total["flips"] == 0, "order_holds": total["order_changes"] == 0,
            "sets": per_set}


def measured_properties(result: dict) -> Dict[str, bool]:
    return {
        "translation_invariant": bool(result["translation_invariance"]["holds"]),
        "argmax_preserving": bool(result["decisions"]["argmax_holds"]),
        "order_preserving": bool(result["decisions"]["order_holds"]),
    }


def merge_audits(results: Sequence[dict]) -> dict:
    """Combine audits of several random draws of one family: a property holds only if it holds for all."""
    if len(results) == 1:
        return results[0]
    first = results[0]
    ti = {
        "tolerance": first["translation_invariance"]["tolerance"],
        "max_abs_diff": max(r["translation_invariance"]["max_abs_diff"] for r in results),
        "mean_abs_diff": max(r["translation_invariance"]["mean_abs_diff"] for r in results),
        "holds": all(r["translation_invariance"]["holds"] for r in results),
    }
    ti["worst"] = max(results, key=lambda r: r["translation_invariance"]["max_abs_diff"])["translation_invariance"]["worst"]
    ti["draws"] = [r["translation_invariance"] for r in results]
    ti["sets"] = {}
    for name in first["translation_invariance"]["sets"]:
        per_draw = [r["translation_invariance"]["sets"][name] for r in results]
        worst = max(per_draw, key=lambda v: v["max_abs_diff"])
        ti["sets"][name] = {"voxels": worst["voxels"], "max_abs_diff": worst["max_abs_diff"],
                            "mean_abs_diff": max(v["mean_abs_diff"] for v in per_draw),
                            "worst_test": worst["worst_test"], "holds": all(v["holds"] for v in per_draw)}
    decisions = {key: sum(r["decisions"][key] for r in results) for key in _COUNT_KEYS}
    decisions["flip_rate"] = _rate(decisions["flips"], decisions["argmax_voxels"])
    decisions["order_change_rate"] = _rate(decisions["order_changes"], decisions["order_voxels"])
    decisions["argmax_holds"] = decisions["flips"] == 0
    decisions["order_holds"] = decisions["order_changes"] == 0
    decisions["draws"] = [r["decisions"] for r in results]
    decisions["sets"] = {}
    for name in first["decisions"]["sets"]:
        summed = {key: sum(r["decisions"]["sets"][name][key] for r in results) for key in _COUNT_KEYS}
        summed["flip_rate"] = _rate(summed["flips"], summed["argmax_voxels"])
        summed["order_change_rate"] = _rate(summed["order_changes"], summed["order_voxels"])
        decisions["sets"][name] = summed
    merged = {"translation_invariance": ti, "decisions": decisions, "drift": first["drift"],
              "declared": first["declared"]}
    merged["measured"] = measured_properties(merged)
    return merged


# ----------------------------------------------------------------------------------------------- verdicts
def parse_require(text: Optional[str]) -> List[str]:
    """'ti,argmax,order' -> property names; InputError on anything else."""
    if not text:
        return []
    names = []
    for part in text.split(","):
        part = part.strip().lower()
        if not part:
            continue
        if part not in REQUIRE_NAMES:
            raise InputError(f"--require: unknown property {part!r}; choose from {', '.join(REQUIRE_NAMES)}")
        if REQUIRE_NAMES[part] not in names:
            names.append(REQUIRE_NAMES[part])
    return names


def verdicts(declared: Optional[Mapping[str, bool]], measured: Mapping[str, bool],
             required: Iterable[str] = ()) -> List[dict]:
    """One row per property: declared, measured, required, verdict, failed.

    A declared property that does not hold is a violation; a required one that does not hold fails the
    requirement. A property that holds without being declared is reported as such (it held on the audited
    voxels, but nothing guarantees it for other inputs).
    """
    required = set(required)
    rows = []
    for name in PROPERTY_NAMES:
        said = None if declared is None else bool(declared.get(name, False))
        holds = bool(measured[name])
        if said and not holds:
            verdict, failed = "VIOLATED (declared)", True
        elif name in required and not holds:
            verdict, failed = "FAILS (required)", True
        elif holds:
            verdict, failed = ("holds" if said or said is None else "holds (not declared)"), False
        else:
            verdict, failed = "does not hold (not declared)", False
        rows.append({"property": name, "short": SHORT_NAMES[name], "declared": said, "measured": holds,
                     "required": name in required, "verdict": verdict, "failed": failed})
    return rows


# ----------------------------------------------------------------------------------------------- drivers
def build_sets(num_classes: int, *, seed: int, random_voxels: int, adversarial_voxels: int,
               data_sample: Optional[torch.Tensor] = None, device=None) -> Dict[str, torch.Tensor]:
    """The voxel sets of an audit: the data sample (or random logits without data), then adversarial logits.

    Both random sets come from their own stream of `seed`, so adding data does not change the adversarial
    set, and the same seed gives the same sets on every machine.
    """
    sets: Dict[str, torch.Tensor] = {}
    if data_sample is not None:
        sets["data"] = data_sample.to(torch.float64)
    elif random_voxels > 0:
        sets["random"] = random_logits(num_classes, random_voxels, torch.Generator().manual_seed(seed))
    if adversarial_voxels > 0:
        sets["adversarial"] = adversarial_logits(num_classes, adversarial_voxels, torch.Generator().manual_seed(seed + 1))
    if not sets:
        raise InputError("nothing to audit: give DATA, or a positive --voxels or --adversarial-voxels")
    return {name: logits.to(device) if device is not None else logits for name, logits in sets.items()}


def audit_calibrator(cal, sets: Mapping[str, torch.Tensor], declared: Optional[Mapping[str, bool]], *,
                     seed: int = 0, tolerance: float = TI_TOLERANCE) -> dict:
    """Audit one calibrator object (anything with `forward` and `num_classes`) against `declared`."""
    _check_classes(cal.num_classes, sets)
    return audit(cal.forward, sets, declared, seed=seed, tolerance=tolerance)


def audit_family(cls, num_classes: int, sets: Mapping[str, torch.Tensor], *, draws: int = 3, seed: int = 0,
                 tolerance: float = TI_TOLERANCE, device=None) -> dict:
    """Audit `draws` random parameter sets of a family (`cls.random`) against the family's declared
    properties; a property is measured to hold only if it holds for every draw."""
    _check_classes(num_classes, sets)
    results = []
    for draw in range(max(1, draws)):
        generator = torch.Generator().manual_seed(seed * 1000 + draw)
        cal = cls.random(num_classes, generator)
        if device is not None:
            cal.to(device)
        results.append(audit(cal.forward, sets, cls.properties.as_dict(), seed=seed + draw, tolerance=tolerance))
    return merge_audits(results)


def _check_classes(num_classes: int, sets: Mapping[str, torch.Tensor]) -> None:
    for name, logits in sets.items():
        if logits.shape[0] != num_classes:
            raise InputError(f"calibrator is for {num_classes} classes but the {name} voxels have {logits.shape[0]}")


def read_declared_properties(payload: Mapping, where: str) -> Optional[Dict[str, bool]]:
    """The `properties` block exactly as an artifact file states it (None when the file has none)."""
    block = payload.get("properties")
    if block is None:
        return None
    if not isinstance(block, Mapping):
        raise InputError(f"artifact 'properties' must be a mapping, not {type(block).__name__}", source=where)
    declared = {}
    for name in PROPERTY_NAMES:
        value = block.get(name, False)
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if not isinstance(value, bool):
            raise InputError(f"artifact property {name!r} must be true or false, not {value!r}", source=where)
        declared[name] = value
    return declared


def load_for_audit(path, expect_classes: Optional[int] = None):
    """Load an artifact for auditing: (calibrator, info, declared properties AS THE FILE STATES THEM).

    `load_artifact` refuses a file whose `properties` block differs from its method's guarantees; the audit
    must instead measure such a file and report the violated claim (exit 1). So the declared block is read
    from the file first, and a file with a non-standard block is validated (format, method, shapes, values)
    through a copy without that block.
    """
    import json
    import tempfile
    from pathlib import Path

    from segcal_cli.calibrators import get_method, load_artifact
    from segcal_cli.calibrators.artifact import _read_payload  # the raw payload, before any checks

    path = Path(path)
    where = str(path)
    payload = _read_payload(path)
    declared = read_declared_properties(payload, where)
    method = payload.get("method")
    family = None
    try:
        family = get_method(method).properties.as_dict()
    except InputError:
        pass  # load_artifact below reports the unknown method with the file name
    if declared is None or family is None or declared == family:
        cal, info = load_artifact(path, expect_classes=expect_classes)
        return cal, info, declared if declared is not None else dict(info["properties"])
    stripped = {k: v for k, v in payload.items() if k != "properties"}
    with tempfile.TemporaryDirectory(prefix="segcal-audit-") as tmp:
        copy = Path(tmp) / f"artifact{path.suffix.lower() if path.suffix.lower() in ('.pt', '.pth') else '.json'}"
        if copy.suffix == ".json":
            copy.write_text(json.dumps(stripped))
        else:
            torch.save(stripped, copy)
        try:
            cal, info = load_artifact(copy, expect_classes=expect_classes)
        except InputError as err:
            raise InputError(str(err).replace(str(copy), where)) from None
    info = dict(info, path=where)
    return cal, info, declared


def evaluate_entry(entry: dict, required: Iterable[str]) -> dict:
    """Add the verdict rows and the failure flag to one audit entry (artifact or family)."""
    declared = entry.get("declared")
    entry["properties"] = verdicts(declared, entry["measured"], required)
    entry["failed"] = any(row["failed"] for row in entry["properties"])
    entry["failures"] = [f"{entry['name']}: {row['property']} {row['verdict']}" for row in entry["properties"] if row["failed"]]
    return entry
