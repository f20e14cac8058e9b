"""Read a volume in a child process while the caller goes on (the CLI imports torch meanwhile).

`ctcolor colorize` spends its first seconds importing torch (and MONAI, for the 3D model) and then reading the series,
both single threaded Python that holds the GIL: a reader thread gains nothing, and the second core waits. A child forked
before those imports reads the volume on that core and hands the voxels back through a file in shared memory (/dev/shm,
a tmpfs; the temporary folder where /dev/shm is too small, as in a default container) that the parent opened and
unlinked before the fork, so that nothing is left behind whatever happens; the parent maps it without copying. The
geometry, metadata and the reader's warnings come through a pipe. `read_volumes_soon` reads several volumes, each in its
own child, and may then run a job on them in the last child: ``ctcolor register`` pre-aligns its pair (SimpleITK, 0.3-4
s) while the parent is still importing torch.

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
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

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
    waits, _ = read_volumes_soon([path], series_uid=series_uid)
    return waits[0]


def read_volumes_soon(
    paths: Sequence[str | os.PathLike],
    then: Callable[[list[Volume]], Any] | None = None,
    series_uid: str | None = None,
) -> tuple[list[Callable[[], Volume]], Later]:
    """Read each of ``paths`` in a child process of its own, side by side, and then run ``then(volumes)`` in the last
    one, which maps the others' voxels once their readers hand them over.

    Returns one wait per path (as `read_volume_soon`'s) and a `Later` for ``then``'s result. ``then`` must be
    picklable in its result and must not need torch (the children are forked before the parent imports it);
    ``ctcolor register`` pre-aligns the pair there (`napari_ctcolor.engines.prealign`). Where no child can run, the
    waits read in this process and the `Later` has no result (None), so that the caller runs ``then`` itself.
    """
    from . import read_volume

    def here(path) -> Callable[[], Volume]:
        return lambda: read_volume(path, series_uid)

    if not _can_fork():
        return [here(path) for path in paths], Later(None)
    files = []
    try:
        for _ in paths:
            fd, name = tempfile.mkstemp(prefix="ctcolor-read-", suffix=".npy", dir=_folder())
            os.unlink(name)  # nameless from the start: it lives while a process holds it open, nothing is left behind
            files.append(os.fdopen(fd, "w+b"))
    except OSError:
        for file in files:
            file.close()
        return [here(path) for path in paths], Later(None)
    context = multiprocessing.get_context("fork")
    # One pipe from each child to this process; with a job, one from each other child to the last (the hand-over).
    pipes = [context.Pipe(duplex=False) for _ in paths]
    handover = [context.Pipe(duplex=False) for _ in paths[:-1]] if then is not None else []
    children = []
    try:
        for index, path in enumerate(paths):
            args = (index, str(path), series_uid, files, pipes, handover, then)
            children.append(context.Process(target=_read_into, args=args, daemon=True))
            children[-1].start()
    except Exception:  # noqa: BLE001 - no child (out of processes, a restricted sandbox): read here
        for child in children:
            if child.is_alive():
                child.terminate()
        for end in (*files, *(end for pipe in (*pipes, *handover) for end in pipe)):
            end.close()
        return [here(path) for path in paths], Later(None)
    for end in (*(send for _, send in pipes), *(end for pipe in handover for end in pipe)):
        end.close()  # the children hold their own ends: a child that dies reads as the end of its pipe
    last = len(paths) - 1
    answers = [
        _Answers(receive, child, expected=1 + (then is not None and index == last))
        for index, ((receive, _), child) in enumerate(zip(pipes, children, strict=True))
    ]

    def wait(index: int, path) -> Callable[[], Volume]:
        def volume() -> Volume:
            try:
                result = answers[index].get(index)
                if result[0] == "failed":  # the child died or failed for another reason than the input: read here
                    return here(path)()
                for category, message in result[-1]:  # the reader's warnings, as if it had run here
                    warnings.warn(message, category, stacklevel=2)
                if result[0] == "input":
                    raise InputError(result[1])
                _, spacing, origin, direction, meta, _ = result
                return Volume(_map_npy(files[index]), spacing, origin, direction, meta)
            finally:
                files[index].close()  # the mapping keeps the pages

        return volume

    return [wait(index, path) for index, path in enumerate(paths)], Later(answers[last] if then is not None else None)


class Later:
    """The result of the job a reader child runs after reading (`read_volumes_soon`'s ``then``)."""

    def __init__(self, answers: _Answers | None) -> None:
        self._answers = answers

    def result(self) -> Any:
        """Wait for the job: its return value; None when the child could not run it (the caller runs it itself).

        Raises:
            InputError: the job's own (a pair that cannot be pre-aligned), with its message.
        """
        if self._answers is None:
            return None
        answer = self._answers.get("then")
        self.cancel()
        if answer[0] == "input":
            raise InputError(answer[1])
        return answer[1] if answer[0] == "ok" else None

    def cancel(self) -> None:
        """End the child if it is still at work (its result is no longer wanted) and let it go."""
        if self._answers is not None:
            self._answers.close()
            self._answers = None


class _Answers:
    """The child's answers by key (a volume's index, or "then"), received in the order it sends them."""

    def __init__(self, receive, child, expected: int) -> None:
        self.receive, self.child, self.expected, self.got = receive, child, expected, {}

    def get(self, key: int | str) -> tuple:
        while key not in self.got and self.receive is not None:
            try:
                answer = self.receive.recv()
            except (EOFError, OSError):  # the child died without an answer (killed, out of memory)
                self.close()
                break
            self.got[answer[0]] = answer[1:]
            if len(self.got) == self.expected:
                self.close()
        return self.got.get(key, ("failed",))

    def close(self) -> None:
        if self.receive is None:
            return
        if self.child.is_alive() and len(self.got) < self.expected:
            self.child.terminate()
        self.receive.close()
        self.receive = None
        self.child.join()


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


def _read_into(index: int, path: str, series_uid: str | None, files, pipes, handover, then) -> None:
    """Child ``index``: read ``path``, write its voxels as .npy into its file (shared with the parent), send the rest
    of the Volume and the reader's warnings to the parent (and, with a job, to the last child). The last child then
    maps the other children's voxels as each hands them over, runs ``then`` on all the volumes and sends its result.
    """
    from . import read_volume

    send = pipes[index][1]
    job = then is not None and index == len(pipes) - 1
    for number, (receive_end, send_end) in enumerate(pipes):  # keep only this child's own ends
        receive_end.close()
        if number != index:
            send_end.close()
    for number, (receive_end, send_end) in enumerate(handover):
        if number != index:
            send_end.close()
        if not job:
            receive_end.close()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                volume, error = read_volume(path, series_uid), None
            except InputError as exc:
                volume, error = None, str(exc)
        said = [(w.category, str(w.message)) for w in caught]
        if volume is None:
            send.send((index, "input", error, said))
            return
        np.save(files[index], volume.array)
        files[index].flush()
        geometry = (volume.spacing, volume.origin, volume.direction, volume.meta)
        send.send((index, "ok", *geometry, said))
        if index < len(handover):
            handover[index][1].send(geometry)
        if job:
            volumes = []
            for number, (receive_end, _) in enumerate(handover):
                geometry = receive_end.recv()  # once that reader has written its voxels; EOFError: it failed, no job
                # A new descriptor of the shared file, so that its offset is this child's own.
                voxels = np.load(f"/proc/self/fd/{files[number].fileno()}", mmap_mode="r")
                volumes.append(Volume(voxels, *geometry))
            try:
                send.send(("then", "ok", then([*volumes, volume])))
            except InputError as exc:
                send.send(("then", "input", str(exc)))
    except BaseException:  # noqa: BLE001 - the parent reads (or runs the job) in its own process instead
        pass
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
