"""Read a volume in a child process while the caller goes on (the CLI imports torch and MONAI meanwhile).

`ctcolor colorize` spends its first seconds importing torch and MONAI and then reading the series, both single
threaded Python that holds the GIL: a reader thread gains nothing, and the second core waits. A child forked before
those imports reads the volume on that core and hands the voxels back through a file in shared memory (/dev/shm, a
tmpfs; the temporary folder where /dev/shm is too small, as in a default container) that the parent opened and
unlinked before the fork, so that nothing is left behind whatever happens; the parent maps it without copying. The
geometry, metadata and the reader's warnings come through a pipe.

The standard library and numpy do this (`multiprocessing` with the fork start method, the .npy format and
`numpy.memmap`). It is used only where it is safe: on Linux, in a single-threaded process that has not yet imported
torch (whose thread pools a fork must not copy) and is not a daemonic worker. Anywhere else, and when the child fails
for a reason other than the input, the caller reads in its own process, as before.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import tempfile
import threading
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..errors import InputError
from .volume import Volume

SHARED_MEMORY_DIR = Path("/dev/shm")
#: The voxels go to /dev/shm when it has this much room (a default container gives it 64 MB), else to the temporary
#: folder; a write that still runs out of room makes the parent read the volume itself.
SHARED_MEMORY_MIN_FREE = 2 << 30


def read_volume_soon(path: str | os.PathLike, series_uid: str | None = None) -> Callable[[], Volume]:
    """Start reading ``path`` as `read_volume` does and return a function that waits for the Volume and returns it.

    Raises (from the returned function): what `read_volume` raises for that input.
    """
    from . import read_volume

    def here() -> Volume:
        return read_volume(path, series_uid)

    if not _can_fork():
        return here
    try:
        fd, name = tempfile.mkstemp(prefix="ctcolor-read-", suffix=".npy", dir=_folder())
    except OSError:
        return here
    os.unlink(name)  # nameless from the start: it lives while a process holds it open, so nothing can be left behind
    voxels = os.fdopen(fd, "w+b")
    context = multiprocessing.get_context("fork")
    receive, send = context.Pipe(duplex=False)
    child = context.Process(target=_read_into, args=(send, voxels, str(path), series_uid), daemon=True)
    try:
        child.start()
    except Exception:  # noqa: BLE001 - no child (out of processes, a restricted sandbox): read here
        for end in (receive, send, voxels):
            end.close()
        return here
    send.close()

    def wait() -> Volume:
        try:
            try:
                result = receive.recv()
            except EOFError:  # the child died without an answer (killed, out of memory): read here instead
                result = ("failed",)
            finally:
                receive.close()
                child.join()
            if result[0] == "failed":
                return here()
            for category, message in result[-1]:  # the reader's warnings, as if it had run here
                warnings.warn(message, category, stacklevel=2)
            if result[0] == "input":
                raise InputError(result[1])
            _, spacing, origin, direction, meta, _ = result
            return Volume(_map_npy(voxels), spacing, origin, direction, meta)
        finally:
            voxels.close()  # the mapping keeps the pages

    return wait


def _map_npy(file) -> np.ndarray:
    """The .npy array in ``file``, mapped copy-on-write: reads share the pages the child wrote, a writer gets its own
    copy of what it writes. (`numpy.load` maps only files it opens by name.)"""
    file.seek(0)
    version = np.lib.format.read_magic(file)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read_header(file)
    return np.memmap(file, dtype=dtype, mode="c", shape=shape, offset=file.tell(), order="F" if fortran else "C")


def _can_fork() -> bool:
    """Linux, a single thread (a fork copies other threads' locks, not the threads), no torch yet (its thread pools),
    and not a daemonic worker process (which may not have children)."""
    return (
        sys.platform.startswith("linux")
        and "torch" not in sys.modules
        and threading.active_count() == 1
        and not multiprocessing.current_process().daemon
    )


def _read_into(send, voxels, path: str, series_uid: str | None) -> None:
    """The child: read, write the voxels as .npy into ``voxels`` (a file shared with the parent), send the rest of
    the Volume and the reader's warnings."""
    from . import read_volume

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                volume, error = read_volume(path, series_uid), None
            except InputError as exc:
                volume, error = None, str(exc)
        said = [(w.category, str(w.message)) for w in caught]
        if volume is None:
            send.send(("input", error, said))
            return
        np.save(voxels, volume.array)
        voxels.flush()
        send.send(("ok", volume.spacing, volume.origin, volume.direction, volume.meta, said))
    except BaseException:  # noqa: BLE001 - the parent reads again in its own process and raises what it meets
        send.send(("failed",))
    finally:
        send.close()


def _folder() -> str:
    """/dev/shm when it has `SHARED_MEMORY_MIN_FREE` free, else the temporary folder."""
    try:
        stat = os.statvfs(SHARED_MEMORY_DIR)
        if stat.f_bavail * stat.f_frsize >= SHARED_MEMORY_MIN_FREE and os.access(SHARED_MEMORY_DIR, os.W_OK):
            return str(SHARED_MEMORY_DIR)
    except OSError:
        pass
    return tempfile.gettempdir()
