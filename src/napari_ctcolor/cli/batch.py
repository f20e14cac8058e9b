"""`ctcolor batch`: many colorize inputs or registration pairs on Dask distributed, with one report.

Each task runs what the single command runs (`app.colorize.colorize_command`, `app.register.register_command`)
with the same options, writing to a temporary name in OUTDIR that is renamed onto the final name only when
complete; so a task that Dask reruns (its worker died) is idempotent. Each output is the single command's answer:
workers run one torch thread and a single ``ctcolor`` process runs one per core, and a CPU's float results depend on
the thread count, so "the same"
means within `SAME_AS_SINGLE`.

- Cluster: a `LocalCluster` by default (N worker processes, one thread each, loopback, no dashboard) or the Dask
  scheduler given with ``--scheduler``. Workers keep their models between tasks: the engines cache their networks
  per process.
- Report: ``OUTDIR/report.csv`` (`REPORT_COLUMNS`), rewritten atomically after every finished input, so an
  interrupted batch keeps what it finished. A re-run skips the inputs a previous report lists as ok whose output
  still exists (unless ``--overwrite``).
- An input that fails becomes an error row with a one-line message; the others go on. Exit code 0 when all inputs
  are ok, 1 when some failed, 2 for bad usage (`InputError` raised before any task starts).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import logging
import os
import re
import shutil
import sys
import time
import uuid
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..app.colorize import ColorizeTask, colorize_command
from ..app.outputs import OUT_OF_MEMORY, check_export_flags
from ..app.register import RegisterTask, register_command
from ..errors import InputError
from ..io import NIFTI_SUFFIXES
from ..io.dicomweb import is_series_url, parse_series_url
from ..io.write import atomic_path

REPORT = "report.csv"
REPORT_COLUMNS = ("input", "output", "status", "seconds", "error")
#: Temporary outputs in OUTDIR start with this; a batch removes its leftovers (from killed workers) when it ends.
PARTIAL_PREFIX = ".partial-"
#: Test hook: when set to a path, the first task to create that file exits its worker process at once (`os._exit`),
#: as a killed worker would; Dask then reruns the task elsewhere.
KILL_ENV = "CTCOLOR_BATCH_TEST_KILL_ONCE"
#: Default local workers: one per core, at most this many (each holds torch and a model, ~0.5 GB).
MAX_DEFAULT_WORKERS = 4
_IMAGE_SUFFIXES = (*NIFTI_SUFFIXES, ".mha", ".mhd", ".nrrd", ".nhdr", ".dcm", ".dicom")
#: Colorize options passed through to every task (the rest of the single command's options are per input).
COLORIZE_OPTIONS = (
    "window",
    "model",
    "device",
    "batch_size",
    "chroma",
    "palette",
    "format",
    "keep_patient_info",
    "allow_non_ct",
    "send",
)
REGISTER_OPTIONS = ("model", "affine", "refine", "device", "send")
#: How far a batch output may lie from the single command's on the same machine (one torch thread against one per
#: core: the network's floats differ in the last bits). Measured between 1 and 2 threads on an AVX-512 CPU, 4 real CTs
#: and 2 registration pairs: colour voxels differing 2.7e-6..3.3e-6 of all, by 1/255; fields 5.6e-5 mm, det J 1.7e-5,
#: warped 0.013 HU. The bounds allow the arithmetic's scatter (the warped image moves by |grad I| * |d ddf|, at most
#: ~1000 HU/mm on CT), not a different result. `tests/conftest.py` asserts them. Registration bounds are for
#: the network alone (``--no-affine --refine 0``). The CT card's default adds the affine pre-alignment and the demons
#: refinement: iterative, multi-threaded SimpleITK optimisations that start from the network's answer, so a last-bit
#: difference may grow in them; those outputs are not held to these bounds.
SAME_AS_SINGLE = {
    "color_step": 1,  # RGB: each channel within 1 of 255 ...
    "color_fraction": 1e-4,  # ... on at most this share of the voxels; all others equal
    "ddf_mm": 1e-3,  # ddf and inverse_ddf, per component
    "jacobian": 1e-3,
    "warped_hu": 1.0,  # the warped image and the checkerboard, in the image's units
}


@dataclass
class Job:
    """One input of a batch: what it reads (``sources``), its report key, and its output name in OUTDIR."""

    key: str
    sources: tuple[str, ...]
    index: int = 0
    output: str = ""
    row: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------- inputs


def _resolve(entry: str, base: Path) -> str:
    """A DICOMweb series URL as given (checked now: a malformed one, or one with credentials written into it, stops
    the batch before they reach the report); a path made absolute (relative to ``base``), so workers with another
    cwd find it."""
    if is_series_url(entry):
        parse_series_url(entry)
        return entry
    if re.match(r"^[a-z][a-z0-9+.-]*://", entry, re.IGNORECASE):
        raise InputError(f"{entry.split('://')[0]}://...: only http(s) DICOMweb series URLs and paths are inputs")
    path = Path(entry).expanduser()
    return str(path if path.is_absolute() else (base / path).absolute())


def read_inputs(entries: Sequence[str]) -> list[str]:
    """INPUT arguments with ``@list.txt`` expanded (one per line; blank lines and # comments ignored; relative paths
    from the list's folder), resolved and without repeats, in order."""
    out: list[str] = []
    for entry in entries:
        if entry.startswith("@"):
            listing = Path(entry[1:]).expanduser()
            try:
                lines = listing.read_text(encoding="utf-8").splitlines()
            except (OSError, UnicodeDecodeError) as exc:
                raise InputError(f"{listing}: cannot read the input list ({type(exc).__name__})") from None
            for line in lines:
                line = line.strip()
                if line and not line.startswith("#"):
                    out.append(_resolve(line, listing.parent.absolute()))
        else:
            out.append(_resolve(entry, Path.cwd()))
    return list(dict.fromkeys(out))


def read_pairs(path: str) -> list[tuple[str, str]]:
    """The (fixed, moving) rows of a pairs CSV (header ``fixed,moving``; relative paths from the CSV's folder)."""
    csv_path = Path(path).expanduser()
    try:
        text = csv_path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{csv_path}: cannot read the pairs CSV ({type(exc).__name__})") from None
    numbered = enumerate(text.splitlines(), 1)
    kept = [(n, line) for n, line in numbered if line.strip() and not line.lstrip().startswith("#")]
    reader = csv.DictReader([line for _, line in kept])
    names = {(name or "").strip().lower(): name for name in reader.fieldnames or []}
    if not {"fixed", "moving"} <= set(names):
        raise InputError(f"{csv_path}: the pairs CSV needs a header with the columns fixed,moving")
    base = csv_path.parent.absolute()
    pairs = []
    for index, row in enumerate(reader, start=1):
        number = kept[index][0] if index < len(kept) else index + 1  # the file's own line number
        fixed, moving = ((row.get(names[c]) or "").strip() for c in ("fixed", "moving"))
        if not fixed or not moving:
            raise InputError(f"{csv_path}: line {number} needs both a fixed and a moving image")
        pairs.append((_resolve(fixed, base), _resolve(moving, base)))
    return list(dict.fromkeys(pairs))


def output_stem(source: str) -> str:
    """A file-name-safe stem for an input: the series UID of a URL, a folder's name, a file's name less its image
    suffix (``ct.nii.gz`` -> ``ct``)."""
    if is_series_url(source):
        with contextlib.suppress(InputError):
            return parse_series_url(source).series_uid
    name = Path(source.rstrip("/\\")).name
    for suffix in _IMAGE_SUFFIXES:
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            name = name[: -len(suffix)]
            break
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "input"


def _unique(stem: str, extension: str, taken: set[str]) -> str:
    name, k = f"{stem}{extension}", 2
    while name.lower() in taken:
        name, k = f"{stem}-{k}{extension}", k + 1
    taken.add(name.lower())
    return name


# ---------------------------------------------------------------------------------------------------------- report


def read_report(outdir: Path) -> dict[str, dict[str, str]]:
    """A previous OUTDIR/report.csv by input (empty when absent or unreadable)."""
    try:
        with (outdir / REPORT).open(newline="", encoding="utf-8") as handle:
            return {row["input"]: row for row in csv.DictReader(handle) if row.get("input")}
    except (OSError, KeyError, csv.Error, UnicodeDecodeError):
        return {}


def write_report(outdir: Path, rows: Sequence[dict[str, Any]]) -> Path:
    """Write OUTDIR/report.csv atomically (`REPORT_COLUMNS`)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, REPORT_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    with atomic_path(outdir / REPORT) as tmp:
        tmp.write_text(buffer.getvalue(), encoding="utf-8")
    return outdir / REPORT


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    if not isinstance(exc, (InputError, OSError)) or not text:
        text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text.splitlines()[0]


# ----------------------------------------------------------------------------------------------- worker-side tasks

_WORKER_READY = False


def _worker_setup() -> None:
    """Once per worker process: quiet pydicom as the CLI does. The engines keep their networks per process
    (`engines.colorize.get_colorizer`, `engines.register.load_registration_model`), so each worker loads a model once.
    """
    global _WORKER_READY
    if not _WORKER_READY:
        logging.getLogger("pydicom").setLevel(logging.CRITICAL)
        _WORKER_READY = True


def _maybe_die_for_test() -> None:
    marker = os.environ.get(KILL_ENV)
    if not marker:
        return
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    os._exit(17)


def _commit(tmp: Path, final: Path) -> None:
    """Rename a finished temporary output onto its final name (replacing a previous output of the same task)."""
    if tmp.is_dir():
        trash = None
        if final.exists():
            trash = final.with_name(f"{PARTIAL_PREFIX}old-{uuid.uuid4().hex[:8]}-{final.name}")
            final.rename(trash)
        tmp.rename(final)
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, final)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def run_task(command: str, options: dict[str, Any], sources: Sequence[str], output: str) -> dict[str, Any]:
    """One input on a worker: the single command into a temporary name beside ``output``, then renamed onto it.

    Returns ``{"status", "seconds", "error", "warnings", "said"}`` (``said``: the lines the single command tells its
    user); an input's error never raises (Dask would retry it).
    """
    _maybe_die_for_test()
    start = time.perf_counter()
    final = Path(output)
    tmp = final.with_name(f"{PARTIAL_PREFIX}{uuid.uuid4().hex[:8]}-{final.name}")
    result: dict[str, Any] = {"status": "ok", "error": "", "warnings": [], "said": []}
    try:
        _worker_setup()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("default")
            if command == "colorize":
                task = ColorizeTask.of({**options, "path": sources[0], "output": str(tmp)})
                colorize_command(task, say=result["said"].append)
            else:
                register_command(
                    RegisterTask.of({**options, "fixed": sources[0], "moving": sources[1], "outdir": str(tmp)}),
                    say=result["said"].append,
                )
        _commit(tmp, final)
        result["warnings"] = list(dict.fromkeys(str(w.message) for w in caught if w.category is not DeprecationWarning))
    except Exception as exc:  # noqa: BLE001 - every failure of one input becomes its report row
        if isinstance(exc, RuntimeError) and "out of memory" in str(exc):
            exc = InputError(OUT_OF_MEMORY)
        result.update(status="error", error=_one_line(exc))
    finally:
        if tmp.exists() or tmp.is_symlink():
            _remove(tmp)
    result["seconds"] = round(time.perf_counter() - start, 3)
    return result


# ---------------------------------------------------------------------------------------------------------- client


def _check_outdir(outdir: Path) -> None:
    if outdir.exists() and not outdir.is_dir():
        raise InputError(f"{outdir}: exists and is not a folder; give a folder for the batch outputs")
    if not outdir.exists() and not outdir.parent.is_dir():
        raise InputError(f"{outdir}: folder {outdir.parent} does not exist")


def _check_colorize_options(args: argparse.Namespace) -> None:
    """The single command's request, checked once before any task (its messages, exit 2, not N errors); a window
    "auto" and the header's window are chosen per CT."""
    from ..app.colorize_job import ColorizeRequest  # torch: the request's rules are the engine's
    from ..app.window import AUTO_WINDOW
    from ..weights import find_weights

    find_weights(args.model)
    window = None if args.window is None or args.window.strip().lower() == AUTO_WINDOW else args.window
    ColorizeRequest.checked(None, window, args.palette, args.chroma, args.device, args.model, args.batch_size)
    check_export_flags(args.format or "nifti", args.keep_patient_info, args.send)  # URL inputs: checked per input


def _check_register_options(args: argparse.Namespace) -> None:
    """The single command's request, checked once before any task (its messages, exit 2, not N errors)."""
    from ..app.register_job import RegisterRequest  # torch: the engine's rules are the request's

    if str(args.model) != "ct" and not Path(args.model).is_file():
        raise InputError(f"{args.model}: model file not found (use 'ct' or the path of a SYMNet .pth checkpoint)")
    RegisterRequest.checked(args.model, args.affine, args.refine, args.device)


def plan_jobs(args: argparse.Namespace, outdir: Path) -> tuple[list[Job], list[Job]]:
    """(jobs to run, jobs skipped as finished), with unique output names in OUTDIR. A job to run whose output name
    exists in OUTDIR (not from a finished row) comes with its error row already set, unless ``--overwrite``."""
    if args.batch_command == "colorize":
        sources = [(s,) for s in read_inputs(args.inputs)]
        if not sources:
            raise InputError("no inputs: give CT paths, DICOMweb series URLs or @LIST.txt")
        extension = ".nii.gz" if (args.format or "nifti") == "nifti" else ""
        jobs = [Job(s[0], s) for s in sources]
    else:
        pairs = read_pairs(args.pairs)
        if not pairs:
            raise InputError(f"{args.pairs}: no pairs (rows of fixed,moving)")
        extension = ""
        jobs = [Job(f"{f} -> {m}", (f, m)) for f, m in pairs]
    for index, job in enumerate(jobs):
        job.index = index
    previous = {} if args.overwrite else read_report(outdir)
    # Names never given to a new output: finished outputs and the inputs themselves (an input inside OUTDIR).
    taken = {REPORT.lower()}
    todo, skipped = [], []
    for job in jobs:
        row = previous.get(job.key)
        if row and row.get("status") == "ok" and row.get("output") and (outdir / row["output"]).exists():
            job.output, job.row = row["output"], {k: row.get(k, "") for k in REPORT_COLUMNS}
            taken.add(job.output.lower())
            skipped.append(job)
    outdir_resolved = outdir.resolve()
    for job in jobs:
        for source in job.sources:
            if not is_series_url(source) and Path(source).resolve().parent == outdir_resolved:
                taken.add(Path(source).name.lower())
    finished = {job.key for job in skipped}
    for job in jobs:
        if job.key in finished:
            continue
        if args.batch_command == "colorize":
            stem = output_stem(job.sources[0])
        else:
            stem = f"{output_stem(job.sources[0])}__{output_stem(job.sources[1])}"
        job.output = _unique(stem, extension, taken)
        if (outdir / job.output).exists() and not args.overwrite:  # not ours: refused as the single command does
            error = f"{outdir / job.output}: exists; use --overwrite to replace it"
            job.row = {"input": job.key, "output": job.output, "status": "error", "seconds": "", "error": error}
        todo.append(job)
    return todo, skipped


@contextlib.contextmanager
def dask_client(workers: int | None, scheduler: str | None, verbose: bool = False) -> Iterator[Any]:
    """A distributed Client: on the given scheduler, or on a LocalCluster of ``workers`` single-threaded processes
    on loopback without a dashboard (closed on exit)."""
    from distributed import Client, LocalCluster

    quiet = logging.INFO if verbose else logging.CRITICAL  # failed inputs are report rows, not worker logs
    for name in ("distributed", "tornado", "bokeh"):
        logging.getLogger(name).setLevel(quiet)
    if scheduler:
        try:
            client = Client(scheduler, timeout="15s")
        except (OSError, TimeoutError, ValueError) as exc:
            raise InputError(f"{scheduler}: cannot reach the Dask scheduler ({_one_line(exc)})") from None
        with client:
            yield client
        return
    n = workers or max(1, min(MAX_DEFAULT_WORKERS, os.cpu_count() or 1))
    with (
        LocalCluster(
            n_workers=n,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address=None,
            silence_logs=quiet,
        ) as cluster,
        Client(cluster) as client,
    ):
        yield client


def _collect(futures: dict, rows: dict, report: Callable[[], Path], desc: str) -> None:
    """Each input's row as its task finishes (the report rewritten each time), with the lines its command told and
    its warnings, under a progress bar."""
    from distributed import as_completed
    from tqdm import tqdm

    with tqdm(total=len(futures), desc=desc, unit="input", file=sys.stderr, disable=None) as bar:
        for future in as_completed(futures):
            job = futures[future]
            try:
                result = future.result()
            except Exception as exc:  # noqa: BLE001 - a task that never returned (e.g. KilledWorker)
                result = {"status": "error", "seconds": "", "error": _one_line(exc), "warnings": []}
            for line in result.get("said", []):
                bar.write(f"{job.key}: {line}", file=sys.stderr)
            for message in result.get("warnings", []):
                bar.write(f"warning: {job.key}: {message}", file=sys.stderr)
            rows[job.key] = {"input": job.key, "output": job.output, **result}
            report()
            bar.update(1)


def run_batch(args: argparse.Namespace, out: Callable[[str], None] | None = None) -> int:
    """`ctcolor batch colorize|register`: plan, run on Dask, report. Returns the exit code (0 all ok, 1 some failed);
    raises InputError for bad usage before any task starts."""
    say = out or (lambda message: print(message, file=sys.stderr, flush=True))
    if args.workers is not None and args.workers < 1:
        raise InputError(f"--workers must be at least 1, got {args.workers}")
    if args.scheduler and args.workers is not None:
        raise InputError("--workers applies to the local cluster; a --scheduler cluster has its own workers")
    outdir = Path(args.outdir)
    _check_outdir(outdir)
    if args.batch_command == "colorize":
        _check_colorize_options(args)
        names = COLORIZE_OPTIONS
    else:
        _check_register_options(args)
        names = REGISTER_OPTIONS
    options = {name: getattr(args, name) for name in names}
    # One torch thread per worker (Dask's default): two workers of two threads each on 2 cores took twice as long
    # (8 small CTs: 31 s against 15.5 s). The outputs stay within `SAME_AS_SINGLE` of a single command's.
    todo, skipped = plan_jobs(args, outdir)
    created = not outdir.exists()
    outdir.mkdir(exist_ok=True)
    outdir = outdir.absolute()
    if skipped:
        say(f"skipping {len(skipped)} finished (ok in {outdir / REPORT}, output present); --overwrite redoes them")
    order = {job.key: job.index for job in [*skipped, *todo]}  # report rows in the order of the inputs
    rows = {job.key: job.row for job in [*skipped, *todo] if job.row}
    todo = [job for job in todo if not job.row]

    def report() -> Path:
        return write_report(outdir, [rows[key] for key in sorted(rows, key=order.__getitem__)])

    if todo:
        try:
            client_context = dask_client(args.workers, args.scheduler, getattr(args, "verbose", False))
            client = client_context.__enter__()
        except InputError:  # e.g. an unreachable --scheduler: leave no empty OUTDIR behind
            if created and not any(outdir.iterdir()):
                outdir.rmdir()
            raise
        with contextlib.ExitStack() as stack:
            stack.push(client_context)
            futures = {}
            for job in todo:
                future = client.submit(
                    run_task,
                    args.batch_command,
                    options,
                    job.sources,
                    str(outdir / job.output),
                    key=f"ctcolor-{args.batch_command}-{uuid.uuid4().hex}",
                    pure=False,
                )
                futures[future] = job
            _collect(futures, rows, report, f"batch {args.batch_command}")
        for leftover in outdir.glob(f"{PARTIAL_PREFIX}*"):  # temporary outputs of tasks whose worker died
            _remove(leftover)
    path = report()
    failed = [row for row in rows.values() if row["status"] != "ok"]
    ran = len(rows) - len(failed) - len(skipped)
    say(
        f"batch {args.batch_command}: {ran} ok, {len(failed)} failed, {len(skipped)} skipped as finished; report {path}"
    )
    return 1 if failed else 0
