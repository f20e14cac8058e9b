"""Compiling the engines' numba kernels once, ahead of the first real run (`ctcolor warmup`; `make setup` runs it).

numba compiles a kernel on its first call and caches the machine code beside its module (``cache=True``, one cache
per machine). On a fresh install the first ``ctcolor colorize`` of the 20-slice DICOM series took 19.6 s, the next
2.8 s (2-core AMD EPYC, 2026-11-26): the difference is compilation. Running the engines once on a small phantom
compiles every kernel the colorize and register paths call, with the argument types a real scan gives them (the
engines convert HU to float32 before any kernel), so the first real run starts warm.
"""

from __future__ import annotations

import time


def warm_kernels() -> dict[str, float]:
    """Colorize (with its class map) and register a small built-in phantom on the CPU; returns the seconds each took
    (compilation, or loading the cache when the kernels were compiled already)."""
    from ..engines.colorize import colorize
    from ..engines.register import register
    from ..phantom import make_phantom

    seconds = {}
    start = time.perf_counter()
    phantom = make_phantom(shape=(8, 96, 96), spacing=(3.0, 3.6, 3.6)).volume
    color = colorize(phantom, device="cpu")
    color.chroma.most_probable(phantom.array)  # the class map (`ctcolor colorize --classes`, the viewer's classes)
    seconds["colorize"] = time.perf_counter() - start
    # Large enough for the field kernels (`models.diffeo.KERNEL_MIN_VOXELS` on the network's grid).
    # Two different phantoms: one image twice would be the identity without the network (`register.COPIES_METRIC`).
    fixed, moving = make_phantom(seed=1).volume, make_phantom(seed=2).volume
    start = time.perf_counter()
    register(fixed, moving, refine=0, device="cpu")  # the network's field kernels (four fields integrated at once)
    register(fixed, moving, refine=1, device="cpu")  # the refinement's kernels
    seconds["register"] = time.perf_counter() - start
    return seconds
