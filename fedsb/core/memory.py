"""Giving a process's freed memory back to the operating system.

glibc's malloc keeps the pages of freed blocks in the process unless they are at the top of its heap,
so a process that trained a client or computed an init holds that work's peak for the rest of the run
(a MiniLM client actor: about 150 MB of free heap after each client's steps; the server after LoRA-SB's
init: about 160 MB). `malloc_trim(0)` returns every whole free page; it takes milliseconds. The
Worker calls `release_free_memory` after each piece of work, so what a simulation holds between them
is what it uses. Elsewhere (another C library, another OS) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _malloc_trim():
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name).malloc_trim  # glibc only
    except (OSError, AttributeError):
        return None


def release_free_memory() -> bool:
    """Return the C heap's free pages to the OS; False where the C library cannot (not glibc)."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
