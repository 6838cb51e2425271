"""Small file helpers shared by everything that writes: outputs appear whole or not at all."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_path(target, suffix: str = ".tmp") -> Iterator[Path]:
    """Yields a temporary path beside `target`; renames it onto `target` when the block succeeds and
    removes it when the block fails (or is interrupted), so `target` never holds a partial file."""
    target = Path(target)
    directory = target.parent if str(target.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix, dir=directory)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def close_quietly(*handles) -> None:
    """Close file / store handles, ignoring errors: used on paths that are already cleaning up."""
    for handle in handles:
        if handle is None:
            continue
        try:
            handle.close()
        except Exception:
            pass
