"""Memory guard: refuse work that would not fit, instead of letting the OS kill the viewer."""

from __future__ import annotations

import os

from .errors import InputError

# Share of the currently available RAM one operation may claim; override with CTCOLOR_MEMORY_FRACTION.
DEFAULT_FRACTION = 0.75


def available_bytes() -> int:
    """Available physical memory in bytes (MemAvailable on Linux, free pages elsewhere)."""
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_memory(nbytes: int, what: object) -> None:
    """Raise InputError when ``nbytes`` exceeds the budget (a fraction of available RAM)."""
    setting = os.environ.get("CTCOLOR_MEMORY_FRACTION", str(DEFAULT_FRACTION))
    try:
        fraction = float(setting)
    except ValueError:
        fraction = float("nan")
    if not fraction > 0:  # a typo must not turn the guard off (nan) or crash the reader with a ValueError
        raise InputError(f"CTCOLOR_MEMORY_FRACTION={setting!r}: give a positive number such as 0.75")
    budget = fraction * available_bytes()
    if nbytes > budget:
        raise InputError(
            f"{what}: needs about {nbytes / 2**30:.1f} GiB, more than the memory budget of {budget / 2**30:.1f} GiB "
            f"({fraction:.0%} of available RAM; set CTCOLOR_MEMORY_FRACTION to change it)"
        )


def release_free_memory() -> None:
    """Hand the C heap's free pages back to the OS (glibc ``malloc_trim``; a no-op elsewhere).

    glibc raises its mmap threshold after large blocks are freed, so later temporaries come from the heap, and
    freed heap memory stays resident. After the colorizer's network phase that was ~200 MB of nothing on a
    512x512x600 CT, resident through the compose phase that allocates the RGB output. One call between the phases,
    with no lasting effect on the allocator, frees it; written here because neither numpy nor torch exposes it.
    """
    trim = libc_function("malloc_trim")
    if trim is not None:
        trim(0)


def libc_function(name: str):
    """A function of the C library by name (``malloc_trim``, ``mallopt``), or None where there is none (not glibc)."""
    import ctypes
    import ctypes.util

    library = ctypes.util.find_library("c")
    return getattr(ctypes.CDLL(library), name, None) if library else None
