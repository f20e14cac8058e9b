"""Compiling the engines' numba kernels once, ahead of the first real run (`ctcolor warmup`; `make setup` runs it).

numba compiles a kernel on its first call and caches the machine code beside its module (``cache=True``, one cache
per machine). On a fresh install the first ``ctcolor colorize`` of the 20-slice DICOM series took 19.6 s, the next
2.8 s (2-core AMD EPYC, 2026-11-26): the difference is compilation. Running the engines once on a small phantom
compiles every kernel the colorize and register paths call, with the argument types a real scan gives them (the
engines convert HU to float32 before any kernel), so the first real run starts warm.

numba compiles in the calling thread and holds the interpreter's lock while it does, so the colorize path and the
register path are compiled in two processes at once where two threads or more are allowed (each writes its own
kernels' cache files; a kernel both paths call is written whole by whichever ends last, as numba replaces its cache
files rather than editing them).
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import time


def warm_colorize() -> float:
    """Colorize (with its class map) a small built-in phantom on the CPU; the seconds it took (compilation, or
    loading the cache when the kernels were compiled already)."""
    from ..engines.colorize import colorize
    from ..phantom import make_phantom

    start = time.perf_counter()
    phantom = make_phantom(shape=(8, 96, 96), spacing=(3.0, 3.6, 3.6)).volume
    color = colorize(phantom, device="cpu")
    color.chroma.most_probable(phantom.array)  # the class map (`ctcolor colorize --classes`, the viewer's classes)
    return time.perf_counter() - start


def warm_register() -> float:
    """Register two small built-in phantoms on the CPU, with and without the refinement; the seconds it took."""
    from ..engines.register import register
    from ..phantom import make_phantom

    start = time.perf_counter()
    # Large enough for the field kernels (`models.diffeo.KERNEL_MIN_VOXELS` on the network's grid).
    # Two different phantoms: one image twice would be the identity without the network (`register.COPIES_METRIC`).
    fixed, moving = make_phantom(seed=1).volume, make_phantom(seed=2).volume
    register(fixed, moving, refine=0, device="cpu")  # the network's field kernels (four fields integrated at once)
    register(fixed, moving, refine=1, device="cpu")  # the refinement's kernels
    return time.perf_counter() - start


def warm_kernels() -> dict[str, float]:
    """Both paths' kernels compiled (`warm_colorize`, `warm_register`): the register path in a second process
    (started afresh, not forked from this one's threads) beside the colorize path here, where two threads or more are
    allowed (`threads.cpu_threads`: torch's count); else one after the other. Returns the seconds each took."""
    from ..threads import cpu_threads

    if cpu_threads() < 2:
        return {"colorize": warm_colorize(), "register": warm_register()}
    spawn = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=spawn) as pool:
        register = pool.submit(warm_register)
        colorize = warm_colorize()
        return {"colorize": colorize, "register": register.result()}
