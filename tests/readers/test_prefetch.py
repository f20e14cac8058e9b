"""The reader children of ``ctcolor register`` (io.prefetch.read_volumes_soon): each input read in a child of its own,
then the pre-alignment run in the last one, while the parent imports torch. Each case runs in a fresh interpreter
that has not imported torch, as the CLI is when it starts the children."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from napari_ctcolor.engines.prealign import prealign
from napari_ctcolor.io import Volume, read_volume, write_nifti

from conftest import CT_DIR, require_shared

CT = CT_DIR / "totalseg-body-3mm-30slices.nii.gz"

_SCRIPT = """
import json, os, sys, time
from pathlib import Path
from napari_ctcolor.app.register import prealign_pair
from napari_ctcolor.errors import InputError
from napari_ctcolor.io import read_volume
from napari_ctcolor.io.prefetch import _can_fork, read_volumes_soon
assert _can_fork() and "torch" not in sys.modules, "the child path must be the one taken"
fixed, moving, flat, out = sys.argv[1:5]
shm = sorted(n for n in os.listdir("/dev/shm") if n.startswith("ctcolor-"))  # the prefetch's (not other tests')

def job_pid(volumes):
    return os.getpid(), [float(v.array.sum()) for v in volumes]

def slow(volumes):
    time.sleep(60)

said = {}
# 1. the volumes and the pre-alignment from the child, against the same calls here
waits, later = read_volumes_soon([fixed, moving], then=prealign_pair)
child = [wait() for wait in waits]
transform = later.result()
said["volumes_equal"] = all(
    (a.array == b.array).all() and (a.spacing, a.origin) == (b.spacing, b.origin) and (a.direction == b.direction).all()
    for a, b in zip(child, (read_volume(fixed), read_volume(moving)))
)
said["parameters"] = list(transform.GetParameters()) + list(transform.GetFixedParameters())
# 2. the job ran in another process, on the volumes read there
waits, later = read_volumes_soon([fixed, moving], then=job_pid)
sums = [float(wait().array.sum()) for wait in waits]
pid, child_sums = later.result()
said["other_process"] = pid != os.getpid()
said["same_sums"] = sums == child_sums
# 3. the job's InputError reaches the caller with its message (a 2D pair cannot be pre-aligned)
waits, later = read_volumes_soon([flat, flat], then=prealign_pair)
[wait() for wait in waits]
try:
    later.result()
    said["input_error"] = None
except InputError as exc:
    said["input_error"] = str(exc)
# 4. a job nobody waits for is ended by cancel(), at once, and leaves no shared-memory file behind
waits, later = read_volumes_soon([fixed], then=slow)
waits[0]()
start = time.perf_counter()
later.cancel()
said["cancel_seconds"] = time.perf_counter() - start
said["shm_left"] = sorted({n for n in os.listdir("/dev/shm") if n.startswith("ctcolor-")} - set(shm))
said["torch"] = "torch" in sys.modules
Path(out).write_text(json.dumps(said))
"""


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path, Path]:
    require_shared()
    folder = tmp_path_factory.mktemp("pair")
    ct = read_volume(CT)
    rigid = sitk.Euler3DTransform()
    image = ct.to_sitk()
    rigid.SetCenter(image.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in image.GetSize()]))
    rigid.SetRotation(0.0, 0.0, np.deg2rad(5.0))
    rigid.SetTranslation((6.0, -4.0, 3.0))
    moved = sitk.Resample(sitk.Cast(image, sitk.sitkFloat32), image, rigid, sitk.sitkLinear, -1024.0)
    moving = Volume(sitk.GetArrayFromImage(moved), ct.spacing, ct.origin, ct.direction)
    flat = Volume(ct.array[15:16], ct.spacing, ct.origin, ct.direction)
    paths = folder / "fixed.nii.gz", folder / "moving.nii.gz", folder / "flat.nii.gz"
    for volume, path in zip((ct, moving, flat), paths, strict=True):
        write_nifti(volume, path)
    return paths


def test_reader_child_reads_both_inputs_and_prealigns_them_as_this_process_does(pair, tmp_path):
    fixed, moving, flat = pair
    out = tmp_path / "said.json"
    subprocess.run([sys.executable, "-c", _SCRIPT, str(fixed), str(moving), str(flat), str(out)], check=True)
    said = json.loads(out.read_text(encoding="utf-8"))  # written by the test's own script just above
    assert said["volumes_equal"] and said["other_process"] and said["same_sums"]
    # The same code on the same voxels with the same seeded metric samples: equal up to the rounding of ITK's
    # threaded sums (1e-9 relative allowed; the optimiser's path would part far more for different inputs).
    here = prealign(read_volume(fixed), read_volume(moving))
    expected = list(here.GetParameters()) + list(here.GetFixedParameters())
    np.testing.assert_allclose(said["parameters"], expected, rtol=1e-9, atol=1e-9)
    assert "pre-alignment works on 3D volumes" in said["input_error"] and "\n" not in said["input_error"]
    assert said["cancel_seconds"] < 10  # terminated, not waited for (the job sleeps 60 s)
    assert said["shm_left"] == [] and not said["torch"]
