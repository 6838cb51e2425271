"""When the numba kernels of fastmath.py are worth loading. Importing this module imports no numba.

Importing numba and loading its cached kernels costs ~0.6 s per process (compiling them the first time on a
machine, several seconds), so they are used from MIN_VALUES stored values on (the 2 GB benchmark file holds
1e9) and small runs stay on torch. Results do not depend on the choice beyond float32 rounding (tested).
SEGCAL_NUMBA=0 turns the kernels off, SEGCAL_NUMBA=1 on at any size.
"""

from __future__ import annotations

import os
from typing import Optional

ENV_VAR = "SEGCAL_NUMBA"
MIN_VALUES = 100_000_000


def setting(env_var: str = ENV_VAR) -> Optional[bool]:
    """An on/off environment switch (SEGCAL_NUMBA by default; also SEGCAL_FUSED, SEGCAL_COMPILE) as True /
    False, or None when unset or unrecognised."""
    value = os.environ.get(env_var, "").strip().lower()
    if value in ("0", "false", "no", "off"):
        return False
    if value in ("1", "true", "yes", "on"):
        return True
    return None


def wanted(values: int, env_var: str = ENV_VAR, min_values: Optional[int] = None) -> bool:
    """Whether data of `values` stored values should use the kernels (before checking that numba works):
    the switch `env_var` when set, else from `min_values` (default MIN_VALUES, read at the call) on."""
    chosen = setting(env_var)
    if chosen is not None:
        return chosen
    return values >= (MIN_VALUES if min_values is None else min_values)
