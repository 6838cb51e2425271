"""`--fail-if EXPR`: parse `name<op>value` checks up front, evaluate them on the result JSON.

A bare metric name means `calibrated.pooled.NAME` with a calibrator, else `uncalibrated.pooled.NAME`; the
preservation keys (`flip_rate`, ...) are top-level names for `preservation.NAME`; `calibrated.NAME` and
`uncalibrated.NAME` mean their pooled values; any other dotted path walks the JSON, numbers index lists
(`calibrated.pooled.dice.3`). An undefined value (null) fails its check.
"""

from __future__ import annotations

import math
import operator
import re
from dataclasses import dataclass

from segcal_cli.errors import InputError
from segcal_cli.metrics.preservation import PRESERVATION_KEYS
from segcal_cli.metrics.state import BOUNDARY_METRICS, METRIC_NAMES, select_metrics

OPERATORS = {"<=": operator.le, ">=": operator.ge, "<": operator.lt, ">": operator.gt}
_EXPR = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_.]*)\s*(<=|>=|<|>)\s*(\S+)\s*$")
_SECTIONS = ("uncalibrated", "calibrated")
_SCOPES = ("pooled", "per_case_mean")
_TOP_LEVEL = ("cases", "voxels", "voxels_read", "bins")


@dataclass(frozen=True)
class Check:
    expr: str
    path: tuple[str, ...]
    op: str
    threshold: float

    def evaluate(self, payload: dict) -> dict:
        value = resolve(payload, self.path)
        if value is not None and not isinstance(value, (int, float)):
            raise InputError(f"--fail-if {self.expr!r}: {'.'.join(self.path)} is not a number")
        defined = value is not None and math.isfinite(value)
        failed = not defined or OPERATORS[self.op](value, self.threshold)
        return {"expr": self.expr, "key": ".".join(self.path), "value": value if defined else None,
                "failed": bool(failed)}


def _metric_ok(name: str, boundary: bool) -> bool:
    return name in METRIC_NAMES or name == "adaptive_ece_bound" or (boundary and name in BOUNDARY_METRICS)


def _require_computed(path: tuple[str, ...], expr: str, metrics) -> None:
    """A check on a metric left out by --metrics can never be evaluated: say so before reading data."""
    if metrics is None or path[0] not in _SECTIONS:
        return
    name = path[2]
    base = "adaptive_ece" if name == "adaptive_ece_bound" else name
    if base in METRIC_NAMES and base not in metrics:
        raise InputError(f"--fail-if {expr!r}: {name} is not computed: add {base} to --metrics "
                         f"(computed: {','.join(metrics)})")


def parse_check(expr: str, *, calibrated: bool, boundary: bool, metrics=None) -> Check:
    """Parse one `--fail-if` expression; InputError on bad syntax, operator or name, or (with `metrics`, the
    names --metrics selected) on a metric that will not be computed."""
    match = _EXPR.match(expr)
    if not match:
        ops = re.search(r"[<>=!]=?|==", expr)
        if ops and ops.group(0) not in OPERATORS:
            raise InputError(f"--fail-if {expr!r}: unknown operator {ops.group(0)!r}; use one of < <= > >=")
        raise InputError(f"--fail-if {expr!r}: expected NAME<op>VALUE with op one of < <= > >=, "
                         f"e.g. 'ece>0.02' or 'flip_rate>0'")
    name, op, raw_value = match.groups()
    try:
        threshold = float(raw_value)
    except ValueError:
        bad_op = re.match(r"^[<>=!]", raw_value)
        if bad_op:
            raise InputError(f"--fail-if {expr!r}: unknown operator {op + raw_value[0]!r}; use one of < <= > >=")
        raise InputError(f"--fail-if {expr!r}: {raw_value!r} is not a number") from None
    if not math.isfinite(threshold):
        raise InputError(f"--fail-if {expr!r}: the threshold must be a finite number")
    parts = tuple(name.split("."))
    path = _resolve_name(parts, expr, calibrated=calibrated, boundary=boundary)
    _require_computed(path, expr, metrics)
    return Check(expr=expr.strip(), path=path, op=op, threshold=threshold)


def _resolve_name(parts: tuple[str, ...], expr: str, *, calibrated: bool, boundary: bool) -> tuple[str, ...]:
    known = sorted(set(METRIC_NAMES + PRESERVATION_KEYS + ("adaptive_ece_bound",)
                       + (BOUNDARY_METRICS if boundary else ())))
    head = parts[0]
    if len(parts) == 1:
        if head in PRESERVATION_KEYS:
            if not calibrated:
                raise InputError(f"--fail-if {expr!r}: {head} needs --calibrator")
            return ("preservation", head)
        if head in _TOP_LEVEL:
            return (head,)
        if _metric_ok(head, boundary):
            return ("calibrated" if calibrated else "uncalibrated", "pooled", head)
        hint = " (needs --boundary)" if head in BOUNDARY_METRICS else ""
        raise InputError(f"--fail-if {expr!r}: unknown metric {head!r}{hint}; known: {', '.join(known)}")
    if head in _SECTIONS:
        if head == "calibrated" and not calibrated:
            raise InputError(f"--fail-if {expr!r}: calibrated metrics need --calibrator")
        rest = parts[1:]
        if rest[0] not in _SCOPES:
            rest = ("pooled",) + rest
        if len(rest) < 2 or not _metric_ok(rest[1], boundary):
            raise InputError(f"--fail-if {expr!r}: unknown metric {'.'.join(parts)!r}; known: {', '.join(known)}")
        if rest[1] in ("dice", "iou"):
            if len(rest) != 3 or not rest[2].isdigit():
                raise InputError(f"--fail-if {expr!r}: per-class {rest[1]} needs a class index, e.g. "
                                 f"{head}.{rest[1]}.0")
        elif len(rest) != 2:
            raise InputError(f"--fail-if {expr!r}: unknown metric {'.'.join(parts)!r}")
        return (head,) + rest
    if head == "preservation":
        if not calibrated:
            raise InputError(f"--fail-if {expr!r}: preservation needs --calibrator")
        if len(parts) == 2 and parts[1] in PRESERVATION_KEYS:
            return parts
        if len(parts) == 3 and parts[1] == "dice_delta" and parts[2].isdigit():
            return parts
        raise InputError(f"--fail-if {expr!r}: unknown preservation key {'.'.join(parts[1:])!r}; known: "
                         f"{', '.join(PRESERVATION_KEYS)}")
    if head in ("dice", "iou") and len(parts) == 2 and parts[1].isdigit():
        return ("calibrated" if calibrated else "uncalibrated", "pooled") + parts
    raise InputError(f"--fail-if {expr!r}: unknown metric {'.'.join(parts)!r}; known: {', '.join(known)}")


def resolve(payload, path: tuple[str, ...]):
    node = payload
    for part in path:
        if isinstance(node, list):
            index = int(part)
            if index >= len(node):
                raise InputError(f"--fail-if: {'.'.join(path)}: there are only {len(node)} classes")
            node = node[index]
        elif isinstance(node, dict) and part in node:
            node = node[part]
        else:
            raise InputError(f"--fail-if: {'.'.join(path)} is not in the results")
        if node is None:
            return None
    return node


def parse_checks(exprs: list[str] | None, *, calibrated: bool, boundary: bool, metrics=None) -> list[Check]:
    return [parse_check(e, calibrated=calibrated, boundary=boundary, metrics=metrics) for e in (exprs or [])]


def parse_metric_list(text: str | None) -> tuple[str, ...] | None:
    """`--metrics ece,nll,...` -> the names in METRIC_NAMES order (None: all); InputError on unknown names."""
    if text is None:
        return None
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise InputError(f"--metrics: name at least one metric, e.g. 'ece,nll,brier,dice'; known: "
                         f"{', '.join(METRIC_NAMES)}")
    unknown = [n for n in names if n not in METRIC_NAMES]
    if unknown:
        hint = " (use --boundary)" if any(n in BOUNDARY_METRICS for n in unknown) else ""
        raise InputError(f"--metrics: unknown metric(s) {', '.join(map(repr, unknown))}{hint}; known: "
                         f"{', '.join(METRIC_NAMES)}")
    return select_metrics(names)


def validate_class_indices(checks: list[Check], num_classes: int) -> None:
    """Per-class paths (`dice.3`) must name an existing class (checked once the class count is known)."""
    for check in checks:
        last = check.path[-1]
        if last.isdigit() and int(last) >= num_classes:
            raise InputError(f"--fail-if {check.expr!r}: class {last} does not exist (the data has "
                             f"{num_classes} classes)")
