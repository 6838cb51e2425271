"""Process-wide allocator settings for streaming large buffers (see `reuse_freed_memory`)."""

from __future__ import annotations

import ctypes
import sys

_done = False


def reuse_freed_memory() -> None:
    """Make glibc keep freed blocks of up to 32 MiB for reuse instead of handing them back to the kernel.

    Every block the stream delivers is a fresh multi-MB buffer (stored arrays, float32 logits, labels), and
    so are the consumers' temporaries. By default glibc serves each from a new mmap and unmaps it on free,
    so every buffer is zero-filled page by page again: ~200,000 page faults and 1.2-1.6 s of kernel time per
    pass over the 2 GB benchmark file, more than reading it. With mmap threshold 32 MiB, trim threshold
    256 MiB and one malloc arena (frees happen in another thread than the allocations, which with per-thread
    arenas strands memory), a pass took ~0 faults once warm and 0.4-0.5 s of kernel time (the page-cache
    copies). Peak RSS did not grow (it is set by the buffers alive at once). No-op off glibc.

    It must run before the first thread that allocates starts (an arena made earlier keeps its own rules):
    the CLI calls it before any command, `segcal_cli.engine` at import for library use."""
    global _done
    if _done or not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8
        libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)
        libc.mallopt(M_TRIM_THRESHOLD, 256 << 20)
        libc.mallopt(M_ARENA_MAX, 1)
        _done = True
    except (OSError, AttributeError):  # musl or another libc: keep its defaults
        pass
