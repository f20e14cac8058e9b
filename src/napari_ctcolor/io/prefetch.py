"""Read a volume in a child process while the caller goes on (the CLI imports torch and MONAI meanwhile).

`ctcolor colorize` spends its first seconds importing torch and MONAI and then reading the series, both single
threaded Python that holds the GIL: a reader thread gains nothing, and the second core waits. A child forked before
those imports reads the volume on that core and hands the voxels back through a file in shared memory (/dev/shm, a
tmpfs; the temporary folder where /dev/shm is too small, as in a default container), which the parent maps without
copying and unlinks; the geometry and metadata come through a pipe.

The standard library does this (`multiprocessing` with the fork start method, `numpy.load` with a memory map). It
is used only where it is safe: on Linux, in a single-threaded process that has not yet imported torch (whose thread
pools a fork must not copy) and is not a daemonic worker. Anywhere else, and when the child fails for a reason other
than the input, the caller reads in its own process, as before.
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


def read_volume_soon(path: str | os.PathLike, series_uid: str | None = None) -> Callable[[], Volume]:
    """Start reading ``path`` as `read_volume` does and return a function that waits for the Volume and returns it.

    Raises (from the returned function): what `read_volume` raises for that input.
    """
    from . import read_volume

    def here() -> Volume:
        return read_volume(path, series_uid)

    if not _can_fork():
        return here
    context = multiprocessing.get_context("fork")
    receive, send = context.Pipe(duplex=False)
    child = context.Process(target=_read_into, args=(send, str(path), series_uid), daemon=True)
    try:
        child.start()
    except Exception:  # noqa: BLE001 - no child (out of processes, a restricted sandbox): read here
        receive.close()
        send.close()
        return here
    send.close()

    def wait() -> Volume:
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
        _, voxels, spacing, origin, direction, meta, _ = result
        try:  # copy-on-write: reads share the child's pages, a writer gets its own copy of what it writes
            array = np.load(voxels, mmap_mode="c")
        finally:
            os.unlink(voxels)  # the mapping outlives the file's name
        return Volume(array, spacing, origin, direction, meta)

    return wait


def _can_fork() -> bool:
    """Linux, a single thread (a fork copies other threads' locks, not the threads), no torch yet (its thread pools),
    and not a daemonic worker process (which may not have children)."""
    return (
        sys.platform.startswith("linux")
        and "torch" not in sys.modules
        and threading.active_count() == 1
        and not multiprocessing.current_process().daemon
    )


def _read_into(send, path: str, series_uid: str | None) -> None:
    """The child: read, write the voxels as .npy into shared memory (or the temporary folder), send the rest of the
    Volume and the reader's warnings."""
    from . import read_volume

    voxels = None
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
        fd, voxels = tempfile.mkstemp(prefix="ctcolor-read-", suffix=".npy", dir=_folder_for(volume.array.nbytes))
        with os.fdopen(fd, "wb") as file:
            np.save(file, volume.array)
        send.send(("ok", voxels, volume.spacing, volume.origin, volume.direction, volume.meta, said))
    except BaseException:  # noqa: BLE001 - the parent reads again in its own process and raises what it meets
        if voxels is not None:
            Path(voxels).unlink(missing_ok=True)
        send.send(("failed",))
    finally:
        send.close()


def _folder_for(nbytes: int) -> str:
    """/dev/shm when it has room for twice ``nbytes``, else the temporary folder."""
    try:
        stat = os.statvfs(SHARED_MEMORY_DIR)
        if stat.f_bavail * stat.f_frsize >= 2 * nbytes + (64 << 20) and os.access(SHARED_MEMORY_DIR, os.W_OK):
            return str(SHARED_MEMORY_DIR)
    except OSError:
        pass
    return tempfile.gettempdir()
