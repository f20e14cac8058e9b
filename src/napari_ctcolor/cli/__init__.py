"""The ``ctcolor`` command line: `parser` (options and help), `subcommands` (what each one runs: a call into the
application layer, `napari_ctcolor.app`, and the lines it prints), `batch` (``ctcolor batch``: many inputs on Dask,
each running the single command's task) and `main` here (exit codes, warnings, errors).

Exit codes: 0 ok; 2 input error (one stderr line starting "error: ", no traceback); 1 unexpected; 130 interrupted.
"""

from __future__ import annotations

import gc
import logging
import sys
import warnings
from collections.abc import Sequence

from ..app.outputs import OUT_OF_MEMORY
from ..errors import InputError
from .parser import PEER_NAMES, build_parser

__all__ = ["PEER_NAMES", "build_parser", "main"]


def _reuse_freed_memory() -> None:
    """Let glibc keep freed memory for reuse in this process instead of handing every large block back to the OS.

    glibc serves blocks over 32 MB with mmap and unmaps them when freed, so each field-sized temporary of a
    registration (83 MB on the OASIS pair) is page-faulted in afresh: `ctcolor register` spent 11.8 s of system time
    in 27 s of wall time. Serving them from the heap and trimming it only above 1 GiB free cuts the run to 20 s; peak
    resident memory rises from 2.6 to 3.9 GB (`BYTES_PER_VOXEL` accounts for it). A no-op where mallopt is absent.
    """
    from ..memory import libc_function

    mallopt = libc_function("mallopt")
    if mallopt is None:
        return
    m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
    mallopt(m_mmap_max, 0)
    mallopt(m_trim_threshold, 1 << 30)


def _join_negative_values(argv: Sequence[str]) -> list[str]:
    """``--window -600,1500`` as ``--window=-600,1500``: argparse takes a value that starts with "-" and is not a
    plain number for an option, and the lung window's centre is negative."""
    out: list[str] = []
    for arg in argv:
        if out and out[-1] == "--window" and arg.startswith("-") and arg[1:2].isdigit():
            out[-1] = f"--window={arg}"
        else:
            out.append(arg)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(_join_negative_values(sys.argv[1:] if argv is None else argv))
    # Only for registration (its field-sized temporaries), only in the ctcolor process itself, not a caller's
    # (tests, scripts) that shares its allocator; not for `ctcolor peer`, which reproduces other tools' recipes as
    # they run, with the default allocator; and not for colorize, whose peak memory it would raise.
    if argv is None and args.command == "register":
        _reuse_freed_memory()
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    # pydicom logs every oddity of a damaged file; our own InputError says what matters, in one line.
    logging.getLogger("pydicom").setLevel(logging.INFO if args.verbose else logging.CRITICAL)
    # Warnings are held back and shown only when the command succeeds: an error exit prints exactly one line.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        try:
            code = args.run(args)
        except InputError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except OSError as exc:  # permissions, a full disk: the user can fix these too
            print(f"error: {exc}".splitlines()[0], file=sys.stderr)
            return 2
        except RuntimeError as exc:
            if "out of memory" not in str(exc):
                raise
            print(f"error: {OUT_OF_MEMORY}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("error: interrupted", file=sys.stderr)
            return 130
    for message in dict.fromkeys(str(w.message) for w in caught if w.category is not DeprecationWarning):
        print(f"warning: {message}", file=sys.stderr)
    if argv is None:
        # The ctcolor process is about to exit: the interpreter's teardown would walk torch's and MONAI's hundreds of
        # thousands of objects with the cycle collector (0.8 s). Frozen, they are left for the OS to reclaim. Every
        # output is written and closed by now; atexit handlers and stream flushes still run.
        gc.freeze()
    return code


if __name__ == "__main__":
    sys.exit(main())
