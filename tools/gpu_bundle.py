"""Build the offline GPU bundle: one folder, at most `BUDGET_MIB`, that runs every GPU test, benchmark row and training
sweep of the project on an air-gapped GPU server with one command (`run.sh`, beside this file as
`gpu_bundle_run.sh`).

What such a server has is PyTorch with CUDA and the packages of its image (`gpu_host_packages.txt`); what it lacks
travels as wheels for its CPython (3.12 by default), fetched once by pip into a cache and resolved here from each
wheel's own requirements, with the host's packages and PyTorch left out. A wheel too large for the budget
(SimpleITK's, 50 MB) travels as an xz tar of its unpacked files instead. The package itself is built from the
checkout as a wheel (its shipped weights and cards inside). The tests that carry the ``gpu`` marker, the training
configs, and the shared CTs those checks read go beside them.

    python tools/gpu_bundle.py [--python 3.12] [--out build/gpu-bundle] [--cache DIR]

Written by hand rather than with ``pip download`` of the whole requirement set: that would resolve PyTorch (several
GB of CUDA wheels) through MONAI's requirement, and every package the server already has.
"""

from __future__ import annotations

import argparse
import contextlib
import email.parser
import hashlib
import io
import lzma
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

from packaging import tags
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

REPO = Path(__file__).resolve().parents[1]
CACHE = Path.home() / ".cache" / "napari-ctcolor" / "gpu-bundle-wheels"
BUDGET_MIB = 60
#: Wheels larger than this travel as an xz tar of their files (`_as_tar`).
TAR_ABOVE_MB = 20
#: Never bundled: the server's own PyTorch (and what only it needs), and what nothing the bundle runs imports:
#: Dask and distributed (with their own requirements) serve only ``ctcolor batch``; pylibjpeg-libjpeg decodes JPEG
#: baseline, lossless and JPEG-LS DICOM, and the bundle's DICOM series is JPEG 2000 (pylibjpeg-openjpeg). 6 MB.
NEVER = {"torch", "triton", "nvidia-cuda-runtime", "setuptools", "pip", "dask", "distributed", "pylibjpeg-libjpeg"}
PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in (39, 35, 34, 31, 28, 27, 24, 17)] + ["manylinux2014_x86_64"]
#: The shared data the bundle's checks read (relative to ../shared/data). The chest CTs the colorizer recipes also
#: train on (66 MB, 33 MB even as xz with the air outside the body made constant) do not fit beside the software: they
#: travel as their prepared training cases (`_prepared_partials`, 6 MB as xz), and the comparison's measures of
#: their blood pools are made again where the CTs are (`training.compare.chests_at_hand`).
SHARED = (
    "ct/totalseg-abdomen-dicom",
    "ct/totalseg-abdomen-dicom-labels.nii.gz",
    "ct/totalseg-body-3mm.nii.gz",
    "ct/totalseg-body-3mm-labels.nii.gz",
    "ct/totalseg-body-3mm-30slices.nii.gz",
    "ct/totalseg-body-3mm-30slices-labels.nii.gz",
    "ct/totalseg-v2-label-names.json",
    "ct/LICENSE-TotalSegmentator.txt",
)


def host_packages() -> set[str]:
    """Canonical names of the packages the GPU server's image holds (`gpu_host_packages.txt`)."""
    text = (REPO / "tools" / "gpu_host_packages.txt").read_text(encoding="utf-8")
    return {canonicalize_name(word) for line in text.splitlines() if not line.startswith("#") for word in line.split()}


def runtime_requirements() -> list[Requirement]:
    """The package's own runtime requirements (pyproject.toml's ``dependencies``)."""
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    return [Requirement(spec) for spec in project["dependencies"]]


def _environment(python: str) -> dict[str, str]:
    env = default_environment()
    env.update(python_version=python, python_full_version=f"{python}.0", sys_platform="linux", platform_system="Linux")
    env.update(platform_machine="x86_64", implementation_name="cpython", os_name="posix", extra="")
    return env


def _supported(python: str) -> set:
    """The wheel tags CPython ``python`` accepts on manylinux x86_64."""
    version = tuple(int(part) for part in python.split("."))
    platforms = [*PLATFORMS, "linux_x86_64"]
    return {*tags.cpython_tags(version, platforms=platforms), *tags.compatible_tags(version, platforms=platforms)}


def _cached(requirement: Requirement, python: str, cache: Path) -> Path | None:
    supported = _supported(python)
    for wheel in sorted(cache.glob("*.whl")):
        name, version, _, wheel_tags = parse_wheel_filename(wheel.name)
        fits = bool(wheel_tags & supported) and requirement.specifier.contains(version, prereleases=True)
        if name == canonicalize_name(requirement.name) and fits:
            return wheel
    return None


def _download(requirement: Requirement, python: str, cache: Path) -> Path:
    """The wheel for ``requirement`` on CPython ``python``, linux x86_64 (from the cache, or fetched into it)."""
    found = _cached(requirement, python, cache)
    if found is None:
        platforms = [arg for platform in PLATFORMS for arg in ("--platform", platform)]
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(cache)]
        command += ["--python-version", python, "--implementation", "cp", *platforms, str(requirement)]
        subprocess.run(command, check=True)
        found = _cached(requirement, python, cache)
    if found is None:
        raise SystemExit(f"error: no wheel of {requirement} for CPython {python} on manylinux x86_64")
    return found


def _requires(wheel: Path, python: str) -> list[Requirement]:
    """A wheel's own requirements that apply on CPython ``python`` on Linux, extras left out."""
    with zipfile.ZipFile(wheel) as archive:
        metadata = next(name for name in archive.namelist() if name.endswith(".dist-info/METADATA"))
        message = email.parser.Parser().parsestr(archive.read(metadata).decode("utf-8"))
    environment = _environment(python)
    out = []
    for spec in message.get_all("Requires-Dist") or []:
        requirement = Requirement(spec)
        if requirement.marker is None or requirement.marker.evaluate(environment):
            out.append(requirement)
    return out


def resolve(python: str, cache: Path) -> list[Path]:
    """Wheels of every runtime dependency the server lacks, and of theirs, for CPython ``python``."""
    have = host_packages() | NEVER
    wanted = [r for r in runtime_requirements() if canonicalize_name(r.name) not in have]
    found: dict[str, Path] = {}
    while wanted:
        requirement = wanted.pop()
        key = canonicalize_name(requirement.name)
        if key in found or key in have:
            continue
        found[key] = _download(requirement, python, cache)
        print(f"  {found[key].name}", flush=True)
        wanted.extend(_requires(found[key], python))
    return sorted(found.values())


#: xz's preset 6 with its faster match finder (hash chains, matches of up to 32 bytes sought): SimpleITK's 274 MB of
#: files took 43 s for 29.6 MB against preset 6's 83 s for 28.7 MB (Python's lzma, one run, a 2-core AMD EPYC with
#: AVX-512, 2026-11-29); preset 3 (31.0 MB) would not fit the budget.
XZ_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 6, "mf": lzma.MF_HC4, "nice_len": 32}]


@contextlib.contextmanager
def _xz_tar(path: Path) -> Iterator[tarfile.TarFile]:
    """A tar written through xz with `XZ_FILTERS` (``tarfile``'s own "w:xz" takes only a preset)."""
    with lzma.open(path, "wb", filters=XZ_FILTERS) as packed, tarfile.open(fileobj=packed, mode="w") as tar:
        yield tar


def _as_tar(wheel: Path, out: Path) -> Path:
    """A wheel's files as an xz tar (what ``run.sh`` unpacks into its site folder), made once beside the wheel."""
    made = wheel.with_name(wheel.name.removesuffix(".whl") + ".tar.xz")
    if not made.exists():
        partial = made.with_suffix(".partial")
        with zipfile.ZipFile(wheel) as archive, _xz_tar(partial) as tar:
            for info in archive.infolist():
                if info.is_dir():
                    continue
                data = archive.read(info)
                member = tarfile.TarInfo(info.filename)
                member.size, member.mode = len(data), 0o755 if info.filename.endswith(".so") else 0o644
                tar.addfile(member, io.BytesIO(data))
        partial.rename(made)
    target = out / made.name
    shutil.copy2(made, target)
    return target


def _package_wheel(out: Path) -> Path:
    """The package built from the checkout (its weights and cards inside), without its dependencies."""
    command = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "-q",
        "-w",
        str(out),
        str(REPO),
    ]
    subprocess.run(command, check=True)
    return next(out.glob("napari_ctcolor-*.whl"))


def _gpu_tests() -> list[Path]:
    """The test files that carry the ``gpu`` marker."""
    return sorted(path for path in (REPO / "tests").rglob("test_*.py") if "mark.gpu" in path.read_text("utf-8"))


def _copy_project(out: Path, shared: Path) -> None:
    """tests/ (the gpu-marked files run; the rest of the folder for what they import), configs/, the pytest settings,
    and the shared data the checks read, laid out as the checkout and ../shared are."""
    project = out / "project"
    shutil.copytree(REPO / "tests", project / "tests", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copytree(REPO / "configs", project / "configs")
    shutil.copy2(REPO / "pyproject.toml", project / "pyproject.toml")
    names = [str(path.relative_to(REPO)) for path in _gpu_tests()]
    (out / "gpu-tests.txt").write_text("\n".join(names) + "\n", encoding="utf-8")
    for relative in SHARED:
        source, target = shared / relative, out / "shared" / "data" / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target)
        elif source.exists():
            shutil.copy2(source, target)


def _prepared_partials(out: Path, cache: Path, shared: Path) -> None:
    """The colour sweeps' chest CTs as their prepared training cases (`training.compare.prepare_partials`, derived
    here from the CTs by the bundle's own code), in one xz tar that ``run.sh`` unpacks into the shared data's
    ``prepared`` folder. Derived once per version of the code, kept in ``cache``."""
    import os

    import yaml

    os.environ["CTCOLOR_SHARED_DATA"] = str(shared)
    from napari_ctcolor.training.compare import prepare_partials

    folder, written = cache / "prepared", set()
    for sweep in sorted((REPO / "configs" / "sweeps").glob("*.yaml")):
        spec = yaml.safe_load(sweep.read_text(encoding="utf-8"))
        recipes, variants = [REPO / r for r in spec["recipes"]], [REPO / v for v in spec.get("variants", [])]
        written |= set(prepare_partials(recipes, variants, folder))
    if not written:
        return
    made = folder / f"{hashlib.sha256(' '.join(sorted(p.name for p in written)).encode()).hexdigest()[:16]}.tar.xz"
    for stale in set(folder.iterdir()) - written - {made}:  # an older code's: 130 MB a set
        stale.unlink()
    if not made.exists():
        with _xz_tar(made.with_suffix(".partial")) as tar:
            for path in sorted(written):
                tar.add(path, arcname=path.name)
        made.with_suffix(".partial").rename(made)
    shutil.copy2(made, out / "shared" / "prepared.tar.xz")


def size_mib(folder: Path) -> float:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file()) / 2**20


def build(python: str, out: Path, cache: Path, shared: Path) -> float:
    """Write the bundle into ``out`` (emptied first); returns its size in MiB."""
    if not re.fullmatch(r"3\.\d+", python):
        raise SystemExit(f"error: --python {python}: give a CPython version such as 3.12")
    if out.exists():
        shutil.rmtree(out)
    wheels = out / "wheels"
    wheels.mkdir(parents=True)
    cache.mkdir(parents=True, exist_ok=True)
    for wheel in resolve(python, cache):
        if wheel.stat().st_size > TAR_ABOVE_MB * 1e6:
            _as_tar(wheel, out / "wheels")
        else:
            shutil.copy2(wheel, wheels / wheel.name)
    _package_wheel(wheels)
    _copy_project(out, shared)
    _prepared_partials(out, cache, shared)
    run = out / "run.sh"
    shutil.copy2(REPO / "tools" / "gpu_bundle_run.sh", run)
    run.chmod(0o755)
    (out / "python-version.txt").write_text(python + "\n", encoding="utf-8")
    return size_mib(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", default="3.12", help="the GPU server's CPython version (default 3.12)")
    parser.add_argument("--out", type=Path, default=REPO / "build" / "gpu-bundle")
    parser.add_argument("--cache", type=Path, default=CACHE, help=f"downloaded wheels, kept (default {CACHE})")
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared" / "data", help="the shared data folder")
    args = parser.parse_args(argv)
    size = build(args.python, args.out, args.cache, args.shared)
    print(f"{args.out}: {size:.1f} MiB (budget {BUDGET_MIB} MiB), for CPython {args.python}")
    if size > BUDGET_MIB:
        print(f"error: the bundle is {size:.1f} MiB, over its budget of {BUDGET_MIB} MiB", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
