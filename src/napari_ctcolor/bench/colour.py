"""`ctcolor bench` sections of the colour pipeline: ``colorize`` (ours against the seed thesis's network),
``pipeline`` (the network alone, in process and whole processes, per device), ``series`` (a whole process on a real
DICOM folder), ``memory`` (peak RSS) and ``batch`` (`ctcolor batch` on a local Dask cluster)."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from .common import (
    OASIS_DIR,
    bench_devices,
    ctcolor_seconds,
    make_row,
    once_row,
    rate_row,
    seconds_row,
    sync_device,
    time_calls,
)

if TYPE_CHECKING:
    from ..io import Volume


#: The seed thesis's colorizer: (in, out, stride) of its 13 3x3 convolutions, and where the x2 upsamplings go.
PEER_LAYERS: tuple[tuple[int, int, int] | str, ...] = (
    (1, 64, 1),
    (64, 64, 2),
    (64, 128, 1),
    (128, 128, 2),
    (128, 256, 1),
    (256, 256, 2),
    (256, 512, 1),
    (512, 256, 1),
    (256, 128, 1),
    "up",
    (128, 64, 1),
    "up",
    (64, 32, 1),
    (32, 16, 1),
    (16, 2, 1),  # + tanh
    "up",
)
PEER_PARAMETERS = 3_896_530

#: Realistic pixel sizes: the colorizer resamples to its own grid, so these make it run at its usual ~128^2 / 64^2.
SIZES: tuple[tuple[int, float], ...] = ((512, 0.78), (256, 1.56))
MODELS = ("colorizer-2d", "colorizer-3d")


class PeerColorizer(nn.Module):
    """The seed thesis's plain encoder-decoder (L in, ab out; 3,896,530 parameters), for speed comparisons only.

    Conv 3x3 + ReLU throughout (stride 2 where marked), three nearest x2 upsamplings, tanh on the last conv.
    """

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for spec in PEER_LAYERS:
            if spec == "up":
                layers.append(nn.Upsample(scale_factor=2, mode="nearest"))
                continue
            c_in, c_out, stride = spec
            layers.append(nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1))
            layers.append(nn.Tanh() if c_out == 2 else nn.ReLU(inplace=True))
        self.net = nn.Sequential(*layers)

    def forward(self, lightness: torch.Tensor) -> torch.Tensor:
        """(N, 1, H, W) L in [0, 1] -> (N, 2, H, W) ab in [-1, 1]."""
        return self.net(lightness)


def parameter_count(module: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def bench_colorize(slices: int, repeats: int, sizes: Sequence[tuple[int, float]] = SIZES) -> list[dict]:
    """End-to-end colorize (HU -> network -> sRGB uint8) slices/s per model, size and device, and the peer network.

    Ratio rows give ours / peer at the same size and device.
    """
    from ..engines.colorize import compose_chroma, get_colorizer, predict_chroma
    from ..engines.device import cpu_bf16, cpu_bf16_instructions
    from ..phantom import make_phantom

    rows: list[dict] = []
    peer = PeerColorizer().eval()
    for size, pixel in sizes:
        volume = make_phantom(seed=7, shape=(slices, size, size), spacing=(2.0, pixel, pixel)).volume
        label = f"{size}x{size}"
        for device in ("cpu", "cuda"):
            if device not in bench_devices():
                for model in (*MODELS, "peer (seed thesis)"):
                    rows.append(
                        make_row("colorize", model, device, label, "slices/s", note="not measured: no CUDA device")
                    )
                continue
            ours: dict[str, float] = {}
            for model in MODELS:
                get_colorizer(model)

                def run(model: str = model, device: str = device, volume: Volume = volume) -> None:
                    chroma = predict_chroma(volume, model, device=device)
                    compose_chroma(volume, chroma, "abdomen", 1.0, device=device)

                bf16 = device == "cpu" and cpu_bf16()
                note = "network in bfloat16 (this CPU's default, engines.device.cpu_bf16)" if bf16 else ""
                row = rate_row("colorize", model, device, label, slices, time_calls(run, repeats, device), note=note)
                rows.append(row)
                ours[model] = row["median"]
                if device == "cpu" and cpu_bf16_instructions():  # the other precision, which this CPU also runs

                    def run_other(model: str = model, volume: Volume = volume, bf16: bool = not bf16) -> None:
                        chroma = predict_chroma(volume, model, device="cpu", bf16=bf16)
                        compose_chroma(volume, chroma, "abdomen", 1.0, device="cpu")

                    name = f"{model} {'float32' if bf16 else 'bfloat16'}"
                    rows.append(rate_row("colorize", name, device, label, slices, time_calls(run_other, repeats)))
            net = peer.to(device)
            peer_slices = min(slices, 16)  # a rate: fewer slices keep the slow peer's share of the run small
            batch = torch.rand(peer_slices, 1, size, size, device=device)
            batch_size = 8 if device == "cpu" else 64

            def run_peer(net: nn.Module = net, batch: torch.Tensor = batch, step: int = batch_size) -> None:
                with torch.inference_mode():
                    for start in range(0, batch.shape[0], step):
                        net(batch[start : start + step])

            row = rate_row(
                "colorize",
                "peer (seed thesis)",
                device,
                label,
                peer_slices,
                time_calls(run_peer, repeats, device),
                note="network only, random weights, full-resolution input",
            )
            rows.append(row)
            for model, rate in ours.items():
                rows.append(
                    make_row(
                        "ratio",
                        f"{model} / peer",
                        device,
                        label,
                        "x",
                        median=round(rate / row["median"], 2),
                        note="end-to-end ours vs peer network alone",
                    )
                )
            peer.to("cpu")
    return rows


def _rss_mb() -> float:
    return int(Path("/proc/self/statm").read_text(encoding="utf-8").split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM): unlike ``ru_maxrss`` it starts afresh at exec, so a subprocess's peak does
    not include the RSS of the parent it was forked from."""
    for line in Path("/proc/self/status").read_text(encoding="utf-8").splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise OSError("no VmHWM in /proc/self/status")


def rss_job(path: str, copies: int, model: str = "colorizer-2d") -> dict:
    """Run in a fresh process: colorize ``copies`` tiles of the int16 slab at ``path`` and report the peak RSS.

    The baseline is taken after the imports, the model load and a warm-up on a tiny input; the input volume counts as
    the job's memory.
    """
    from ..engines.colorize import colorize, get_colorizer
    from ..io import Volume

    get_colorizer(model)
    # Warmed up on 2 slices of 32²: numba loads its compiled kernels (~80 MB of code) at their first call, part of
    # the program like torch's libraries, not of this job's memory.
    tiny = np.full((2, 32, 32), 40, dtype=np.int16)
    colorize(Volume(tiny, spacing=(2.0, 0.8, 0.8), meta={"modality": "CT"}), model, window="abdomen", device="cpu")
    base = _rss_mb()
    slab = np.load(path)
    array = np.tile(slab["array"], (copies, 1, 1))
    volume = Volume(array, spacing=tuple(slab["spacing"]), meta={"modality": "CT"})
    del slab
    start = time.perf_counter()
    color = colorize(volume, model, window="abdomen", device="cpu")
    seconds = time.perf_counter() - start
    peak = _peak_rss_mb()
    input_mb = array.nbytes / 2**20
    return {
        "shape": list(array.shape),
        "input_mb": round(input_mb, 1),
        "output_mb": round(color.rgb.nbytes / 2**20, 1),
        "baseline_rss_mb": round(base),
        "peak_rss_mb": round(peak),
        "peak_minus_baseline_mb": round(peak - base),
        "ratio_to_input": round((peak - base) / input_mb, 2),
        "seconds": round(seconds, 2),
    }


def bench_rss(slices: int = 600, size: int = 512, model: str = "colorizer-2d") -> list[dict]:
    """Peak RSS of colorizing a (slices, size, size) int16 CT, measured in a subprocess (its own peak)."""
    from ..phantom import make_phantom

    base_slices = 60
    copies = max(1, slices // base_slices)
    volume = make_phantom(seed=3, shape=(base_slices, size, size), spacing=(2.0, 0.78, 0.78)).volume
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "slab.npz")
        np.savez(path, array=volume.array.astype(np.int16), spacing=np.asarray(volume.spacing))
        job = f"rss_job({path!r}, {copies})"
        code = f"import json; from napari_ctcolor.bench.colour import rss_job; print(json.dumps({job}))"
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    label = "x".join(str(n) for n in result["shape"][::-1])
    return [
        once_row(
            "memory",
            f"{model} peak RSS - baseline",
            label,
            "MB",
            result["peak_minus_baseline_mb"],
            f"{result['ratio_to_input']}x the int16 input ({result['input_mb']} MB); baseline "
            f"{result['baseline_rss_mb']} MB, peak {result['peak_rss_mb']} MB",
            ratio_to_input=result["ratio_to_input"],
            **{k: result[k] for k in ("baseline_rss_mb", "peak_rss_mb", "input_mb")},
        ),
        once_row(
            "memory",
            f"{model} end to end",
            label,
            "s",
            result["seconds"],
            f"{result['shape'][0] / result['seconds']:.1f} slices/s",
        ),
    ]


#: Inputs of the batch bench: this many copies of a CT, through one `ctcolor batch` on this many local workers.
BATCH_INPUTS, BATCH_WORKERS = 8, 2
BATCH_CT = OASIS_DIR.parent / "ct" / "totalseg-body-3mm-30slices.nii.gz"


def bench_batch(quick: bool, repeats: int, ct_path: Path = BATCH_CT) -> list[dict]:
    """`ctcolor batch colorize` of `BATCH_INPUTS` series on a `BATCH_WORKERS`-worker LocalCluster against as many
    sequential `ctcolor colorize` processes, each a whole process (start-up, cluster, reading, writing) in this run;
    the ratio row is batch / sequential (the target is <= 0.6x). The series are the shared 30-slice CT written as
    NIfTI (``quick``: two 8-slice 64x64 crops of it, one repeat), or phantoms when the shared data is absent.
    """
    from ..io import Volume, read_volume, write_nifti
    from ..phantom import make_phantom

    n, workers = (2 if quick else BATCH_INPUTS), BATCH_WORKERS
    if ct_path.is_file():
        ct = read_volume(ct_path)
        source = "shared 30-slice CT"
    else:
        ct = make_phantom(seed=5, shape=(30, 128, 128), spacing=(3.0, 3.0, 3.0)).volume
        source = "phantom (shared CT absent)"
    array = ct.array[:8, 20:84, 30:94] if quick else ct.array
    label = f"{n} x " + "x".join(map(str, array.shape[::-1]))
    batch_item = f"ctcolor batch colorize, {workers} workers (whole process)"
    single_item = f"{n} x ctcolor colorize (sequential processes)"
    seconds: dict[str, list[float]] = {batch_item: [], single_item: []}
    with tempfile.TemporaryDirectory() as tmp:
        inputs = []
        for k in range(n):  # the copies differ by one voxel, so no two inputs are the same file
            copy = array.copy()
            copy.flat[k] += 1
            path = Path(tmp) / f"series{k}.nii.gz"
            write_nifti(Volume(copy, ct.spacing, ct.origin, ct.direction.copy(), meta=dict(ct.meta)), path)
            inputs.append(str(path))
        for r in range(repeats):
            out = Path(tmp) / f"batch{r}"
            seconds[batch_item].append(
                ctcolor_seconds(
                    ["batch", "colorize", *inputs, "-o", str(out), "--workers", str(workers), "--device", "cpu"]
                )
            )
            start = time.perf_counter()
            for k, path in enumerate(inputs):
                ctcolor_seconds(["colorize", path, "-o", str(Path(tmp) / f"single{r}-{k}.nii.gz"), "--device", "cpu"])
            seconds[single_item].append(time.perf_counter() - start)
    rows = [seconds_row("batch", item, "cpu", label, values, note=source) for item, values in seconds.items()]
    ratio = statistics.median(seconds[batch_item]) / statistics.median(seconds[single_item])
    rows.append(
        make_row(
            "ratio", "batch / sequential processes", "cpu", label, "x", median=round(ratio, 2), note="target <= 0.6x"
        )
    )
    return rows


#: The real CT behind the end-to-end series row: 141 slices of 512² at 2 mm, resampled to 1 mm (282 slices).
SERIES_CT = OASIS_DIR.parent / "ct" / "chest-popi-2mm.nii.gz"
SERIES_SLICE_MM = 1.0


def write_bench_series(source: Path, folder: Path, slice_mm: float = SERIES_SLICE_MM) -> int:
    """Write ``source`` resampled to ``slice_mm`` slices (linear, SimpleITK) as a plain uncompressed DICOM CT series
    in ``folder``, as a scanner writes one (CT Image Storage, explicit VR little endian, one file per slice).
    Returns the number of slices. Uses the project's grey DICOM writer, then marks the files as CT acquisitions (the
    writer labels its output Secondary Capture, as a derived image should be)."""
    import pydicom
    import SimpleITK as sitk

    from ..io import read_volume
    from ..io.export import write_grey_dicom

    image = sitk.ReadImage(str(source))
    spacing = (*image.GetSpacing()[:2], slice_mm)
    size = (*image.GetSize()[:2], round(image.GetSize()[2] * image.GetSpacing()[2] / slice_mm))
    resampled = sitk.Resample(
        image,
        size,
        sitk.Transform(),
        sitk.sitkLinear,
        image.GetOrigin(),
        spacing,
        image.GetDirection(),
        -1024.0,
        sitk.sitkInt16,
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ct.nii.gz"
        sitk.WriteImage(resampled, str(path))
        volume = read_volume(path)
    meta = {"modality": "CT", "window": [40.0, 400.0]}
    files = write_grey_dicom(volume, folder, source_meta=meta, derivation="bench series", suffix="bench")
    for file in files:
        dataset = pydicom.dcmread(file)
        dataset.SOPClassUID = dataset.file_meta.MediaStorageSOPClassUID = pydicom.uid.CTImageStorage
        dataset.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        dataset.save_as(file)
    return len(files)


def _ctcolor_peak(args: Sequence[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS in MB) of ``ctcolor ARGS`` as its own process. The peak is the child's VmHWM, read
    every 20 ms until it exits (a high-water mark: the last reading holds every earlier peak); its ru_maxrss would
    start from this process's own RSS at the fork."""
    command = [sys.executable, "-m", "napari_ctcolor", *args]
    start = time.perf_counter()
    peak = 0.0
    with tempfile.TemporaryFile() as errors:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=errors)
        status = Path(f"/proc/{process.pid}/status")
        while process.poll() is None:
            try:
                line = next(x for x in status.read_text(encoding="utf-8").splitlines() if x.startswith("VmHWM:"))
                peak = max(peak, int(line.split()[1]) / 1024)
            except (OSError, StopIteration):  # exiting: the last reading stands
                pass
            time.sleep(0.02)
        seconds = time.perf_counter() - start
        if process.returncode != 0:
            errors.seek(0)
            raise RuntimeError(f"ctcolor {' '.join(args)} failed: {errors.read().decode().strip()[-300:]}")
    return seconds, peak


def bench_series(quick: bool, repeats: int, source: Path = SERIES_CT) -> list[dict]:
    """What a user waits for: a whole ``ctcolor colorize FOLDER -o out.nii.gz`` process on a real uncompressed DICOM
    series of 512² slices (`write_bench_series`; ``quick``: its first 2 mm slices, 20 of them), slices/s and the
    process's peak RSS against the int16 input."""
    from ..engines.device import resolve_device

    if not source.is_file():
        return [
            make_row("series", "ctcolor colorize (whole process)", "cpu", "", "slices/s", note="not measured: no CT")
        ]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "series"
        if quick:
            from ..io import Volume, read_volume
            from ..io.export import write_grey_dicom

            ct = read_volume(source)
            part = Volume(ct.array[:20], ct.spacing, ct.origin, ct.direction, meta={"modality": "CT"})
            count = len(write_grey_dicom(part, folder, source_meta={"modality": "CT", "window": [40.0, 400.0]}))
        else:
            count = write_bench_series(source, folder)
        seconds, peaks = [], []
        for k in range(repeats):
            wall, peak = _ctcolor_peak(["colorize", str(folder), "-o", str(Path(tmp) / f"out{k}.nii.gz")])
            seconds.append(wall)
            peaks.append(peak)
    label = f"512x512x{count}"
    input_mb = count * 512 * 512 * 2 / 2**20
    return [
        rate_row(
            "series",
            "ctcolor colorize DICOM folder -> .nii.gz (whole process)",
            resolve_device("auto").type,  # what the command's default --device auto runs on
            label,
            count,
            seconds,
            note=f"{source.name} at {SERIES_SLICE_MM:g} mm, uncompressed DICOM; peak RSS {max(peaks):.0f} MB "
            f"({max(peaks) / input_mb:.1f}x the int16 input, start-up included)",
        )
    ]


PIPELINE_CT = OASIS_DIR.parent / "ct" / "totalseg-abdomen-dicom"
PIPELINE_SLICES = 400


#: The stages of one colorize, as `_stage_seconds` splits it (the rows' names).
STAGES = (
    "network alone (forward passes inside colorize)",
    "network phase besides the forward passes (input, kept classes)",
    "anatomy and enclosure stages",
    "compose stage (guided upsampling, sRGB)",
)


def _stage_seconds(volume: Volume, device: str) -> tuple[list[float], float]:
    """Seconds of each of `STAGES` in one colorize of ``volume``, and of the whole: the shipped 2D network's forward
    passes timed by hooks around its forward (they wait for the device, so this call runs a little slower than an
    untimed one), the network phase's end from its last step, and the compose stage as `compose_chroma` of the
    result: `colorize` is `predict_chroma` then `compose_chroma`."""
    from ..engines.colorize import compose_chroma, get_colorizer, predict_chroma

    net, _ = get_colorizer("colorizer-2d")
    started, spent, steps = [0.0], [0.0], []

    def before(_module: nn.Module, _args: Any) -> None:
        sync_device(device)
        started[0] = time.perf_counter()

    def after(_module: nn.Module, _args: Any, _out: Any) -> None:
        sync_device(device)
        spent[0] += time.perf_counter() - started[0]

    hooks = net.register_forward_pre_hook(before), net.register_forward_hook(after)
    try:
        start = time.perf_counter()
        chroma = predict_chroma(volume, net, device=device, progress=lambda *_: steps.append(time.perf_counter()))
        sync_device(device)
        predicted = time.perf_counter()
        compose_chroma(volume, chroma, "abdomen", device=device)
        sync_device(device)
        end = time.perf_counter()
    finally:
        for hook in hooks:
            hook.remove()
    return [spent[0], steps[-1] - start - spent[0], predicted - steps[-1], end - predicted], end - start


def bench_pipeline(quick: bool, repeats: int, source: Path = PIPELINE_CT) -> list[dict]:
    """Where colorize's time goes, per device: the network's forward passes alone, the whole pipeline in process
    (reading HU from memory to the sRGB array) with the share of its time outside the network, and whole
    ``ctcolor colorize`` processes (start-up, reading and writing included) of the DICOM series and of a
    `PIPELINE_SLICES`-slice ``.nii.gz`` (the series repeated forwards and backwards; ``quick``: 20 slices)."""
    from ..engines.colorize import colorize
    from ..io import Volume, read_volume, write_nifti

    if not source.is_dir():
        return [make_row("pipeline", "colorize() in process", "cpu", "", "slices/s", note=f"not measured: no {source}")]
    series = read_volume(source)
    count = series.shape[0] if quick else PIPELINE_SLICES
    order = np.concatenate(
        [np.arange(series.shape[0])[:: 1 - 2 * (k % 2)] for k in range(-(-count // series.shape[0]))]
    )
    volume = Volume(series.array[order[:count]], series.spacing, series.origin, series.direction, dict(series.meta))
    size = "x".join(str(n) for n in volume.shape[::-1])  # the in-process rows
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        nifti = Path(tmp) / "ct.nii.gz"
        write_nifti(volume, nifti)
        for device in bench_devices():
            colorize(volume, window="abdomen", device=device)  # warm: the model, the kernels, the allocator
            stages, whole = _stage_seconds(volume, device)
            share = f"outside the network: {1 - stages[0] / whole:.0%} of a call timed by stage (same run)"
            for item, seconds in zip(STAGES, stages, strict=True):
                note = f"{seconds / whole:.0%} of the call" if item != STAGES[0] else ""
                rows.append(rate_row("pipeline", item, device, size, count, [seconds], note=note))

            def run(device: str = device) -> None:
                colorize(volume, window="abdomen", device=device)

            seconds = time_calls(run, repeats, device, warmup=0)
            rows.append(rate_row("pipeline", "colorize() in process", device, size, count, seconds, note=share))
            for label, path, processed in (
                ("ctcolor colorize .nii.gz -> .nii.gz (whole process)", nifti, volume),
                ("ctcolor colorize DICOM folder -> .nii.gz (whole process)", source, series),
            ):
                out = str(Path(tmp) / f"out-{device}.nii.gz")
                arguments = ["colorize", str(path), "-o", out, "--window", "abdomen", "--device", device, "--overwrite"]
                shape = "x".join(str(n) for n in processed.shape[::-1])
                walls = [ctcolor_seconds(arguments)]
                rows.append(
                    rate_row(
                        "pipeline", label, device, shape, processed.shape[0], walls, note="start-up, reading, writing"
                    )
                )
    return rows


# ---------------------------------------------------------------------------------------------------------------------
# register-device: whole ``ctcolor register`` processes on every device of this machine in the same run (the GPU
# bundle's rows, docs/gpu-server.md), with the share of each engine stage. The pairs need only the shared data the
# bundle carries: the 3 mm CT against a smooth deformation of itself, and the 20-slice 512² contrast series repeated
# forwards and backwards to `LARGE_SLICES` slices against itself turned `TURN_DEG` about the patient's long axis and
# moved `SHIFT_MM` to the patient's left (``quick``: the 30-slice cut, and the 20 slices at 128²).
# ---------------------------------------------------------------------------------------------------------------------
