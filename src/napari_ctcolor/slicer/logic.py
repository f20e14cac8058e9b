"""3D Slicer logic: the jobs of `app` on MRML volume nodes, without Qt (testable with the ``slicer-core`` wheel).

Geometry: a volume node's IJKToRAS matrix maps voxel index (i, j, k) to RAS mm; a `Volume` keeps the index -> LPS
affine (spacing, origin, direction). RAS = diag(-1, -1, 1) LPS, so the two are converted exactly (oblique and
flipped directions included), and ``slicer.util.arrayFromVolume`` gives the (k, j, i) = (Z, Y, X) array a `Volume`
holds.

Registration: the engine's displacement field (mm, LPS, on the fixed grid; fixed point p maps to moving point
p + u(p)) becomes a ``vtkMRMLGridTransformNode`` whose "from parent" transform is that mapping in RAS: what Slicer
uses to resample the moving image into the fixed image's space, so Slicer's Transforms module can apply, harden or
invert it.

Example (inside Slicer's Python console, or with ``slicer-core``)::

    from napari_ctcolor.slicer.logic import colorize_node, register_nodes
    colour = colorize_node(ct_node, window=(40, 400))              # a vtkMRMLVectorVolumeNode, RGB
    result = register_nodes(fixed_node, moving_node)               # .warped, .transform, .checkerboard, .jacobian
    moving_node.SetAndObserveTransformNodeID(result.transform.GetID())
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import InputError
from ..io import ColorVolume, Volume

#: RAS = FLIP @ LPS (and back: the matrix is its own inverse).
FLIP = np.diag([-1.0, -1.0, 1.0])


def _slicer():
    try:
        import slicer
    except ImportError:
        raise InputError("3D Slicer's MRML core is not installed: pip install 'napari-ctcolor[slicer]'") from None
    return slicer


def _matrix(vtk_matrix) -> np.ndarray:
    return np.array([[vtk_matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def _vtk_matrix(array: np.ndarray):
    import vtk

    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(array[r, c]))
    return matrix


def ijk_to_ras(volume: Volume | ColorVolume) -> np.ndarray:
    """The 4x4 IJKToRAS matrix of a Volume's grid."""
    lps = volume.affine
    out = np.eye(4)
    out[:3, :4] = FLIP @ lps[:3, :4]
    return out


def node_ijk_to_ras(node) -> np.ndarray:
    """The 4x4 IJKToRAS matrix of a volume node."""
    import vtk

    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return _matrix(matrix)


def _to_world(node) -> np.ndarray:
    """The 4x4 matrix from the node's RAS to the scene's world RAS: its parent transforms composed (the identity
    without any); `InputError` for a non-linear one, which no grid holds."""
    import vtk

    parent = node.GetParentTransformNode()
    if parent is None:
        return np.eye(4)
    if not parent.IsTransformToWorldLinear():
        raise InputError(
            f"{_name(node)}: the volume is under a non-linear transform ({_name(parent)}); harden it first "
            "(Transforms module) or use the volume without it"
        )
    matrix = vtk.vtkMatrix4x4()
    parent.GetMatrixTransformToWorld(matrix)
    return _matrix(matrix)


def _geometry(node, world: bool = False) -> tuple[tuple[float, float, float], tuple[float, float, float], np.ndarray]:
    """(spacing (z, y, x), origin LPS (x, y, z), direction LPS) of a volume node, from its IJKToRAS; ``world``: in
    the scene's world coordinates, its linear parent transforms applied (`_to_world`)."""
    to_ras = _to_world(node) @ node_ijk_to_ras(node) if world else node_ijk_to_ras(node)
    lps = FLIP @ to_ras[:3, :4]
    spacing_xyz = np.linalg.norm(lps[:, :3], axis=0)
    return tuple(spacing_xyz[::-1]), tuple(lps[:, 3]), lps[:, :3] / spacing_xyz


def _name(node) -> str:
    return node.GetName() or node.GetID() or "volume node"


def volume_from_node(node, world: bool = False) -> Volume:
    """A `Volume` (a copy of the voxels, in the node's units) from a scalar volume node: on the node's own grid, or
    with ``world`` where the scene shows it (its linear parent transforms applied: a volume moved by hand in the
    Transforms module).

    Raises:
        InputError: no node, no image data, a vector (colour) volume, geometry that is no grid (sheared), or with
            ``world`` a non-linear parent transform.
    """
    slicer = _slicer()
    if node is None or not node.IsA("vtkMRMLVolumeNode"):
        raise InputError("expected a volume node")
    if node.GetImageData() is None:
        raise InputError(f"{_name(node)}: the volume node has no image data")
    if node.IsA("vtkMRMLVectorVolumeNode") or node.GetImageData().GetNumberOfScalarComponents() != 1:
        raise InputError(f"{_name(node)}: a vector (colour) volume cannot be read as a CT; choose a scalar volume")
    array = np.array(slicer.util.arrayFromVolume(node))
    spacing, origin, direction = _geometry(node, world)
    meta = {"source": _name(node), "modality": "CT"}
    display = node.GetDisplayNode()
    if (
        display is not None
        and hasattr(display, "GetWindow")
        and display.GetWindow() > 0
        and not display.GetAutoWindowLevel()
    ):
        meta["window"] = [float(display.GetLevel()), float(display.GetWindow())]
    try:
        return Volume(array, spacing=spacing, origin=origin, direction=direction, meta=meta)
    except InputError as exc:  # the geometry's own message ("direction cosines are not orthonormal ..."), named
        raise InputError(f"{_name(node)}: {exc}") from None


def _image_data(array: np.ndarray, components: int):
    """vtkImageData holding ``array`` ((k, j, i) or (k, j, i, c)), origin 0 and spacing 1 (the node holds geometry)."""
    import vtk
    from vtk.util import numpy_support

    image = vtk.vtkImageData()
    image.SetDimensions(*array.shape[:3][::-1])
    flat = (
        np.ascontiguousarray(array).reshape(-1, components) if components > 1 else np.ascontiguousarray(array).ravel()
    )
    scalars = numpy_support.numpy_to_vtk(flat, deep=True)
    scalars.SetNumberOfComponents(components)
    image.GetPointData().SetScalars(scalars)
    return image


def node_from_volume(volume: Volume | ColorVolume, scene, name: str = "", class_name: str | None = None):
    """Add a volume node to ``scene`` holding ``volume``'s voxels at its place: a scalar volume node for a `Volume`,
    an RGB vector volume node for a `ColorVolume`."""
    color = isinstance(volume, ColorVolume)
    class_name = class_name or ("vtkMRMLVectorVolumeNode" if color else "vtkMRMLScalarVolumeNode")
    node = scene.AddNewNodeByClass(class_name, name)
    node.SetAndObserveImageData(_image_data(volume.rgb if color else volume.array, 3 if color else 1))
    node.SetIJKToRASMatrix(_vtk_matrix(ijk_to_ras(volume)))
    node.CreateDefaultDisplayNodes()
    return node


def colorize_node(
    volume_node,
    window: str | tuple[float, float] | None = None,
    model: str = "colorizer-2d",
    palette: str | None = None,
    device: str = "auto",
    progress=None,
    cancel=None,
):
    """Colorize a CT volume node; returns a new ``vtkMRMLVectorVolumeNode`` (RGB uint8, the same IJKToRAS, under the
    same parent transform: it shows where the CT shows) named "<name> colorized" in the node's scene. Nothing is
    added when it fails."""
    from ..app.colorize_job import ColorizeRequest, colorize_job

    volume = volume_from_node(volume_node)
    request = ColorizeRequest.checked(volume, window, palette or "anatomical", device=device, model=model)
    color = colorize_job(volume, request, progress=progress, cancel=cancel).color
    node = node_from_volume(color, volume_node.GetScene(), f"{_name(volume_node)} colorized")
    node.SetAndObserveTransformNodeID(volume_node.GetTransformNodeID())
    return node


@dataclass
class NodeRegistration:
    """What `register_nodes` adds to the scene, and the engine's numbers.

    Attributes:
        warped: the moving volume resampled onto the fixed grid (scalar volume node).
        transform: grid transform node; its "from parent" transform maps fixed-space RAS points to moving RAS points.
        checkerboard: fixed vs warped, 20 mm tiles (scalar volume node).
        jacobian: det J of the fixed -> moving mapping (scalar volume node).
        metrics: the engine's metrics (NCC before/after, folding, seconds, ...).
    """

    warped: Any
    transform: Any
    checkerboard: Any
    jacobian: Any
    metrics: dict[str, Any]


def grid_transform_node(ddf: np.ndarray, grid: Volume, scene, name: str = "ctcolor displacement"):
    """A ``vtkMRMLGridTransformNode`` whose "from parent" transform is p -> p + ddf(p), converted to RAS.

    Args:
        ddf: (Z, Y, X, 3) mm, LPS, on ``grid``, ITK convention (as `RegistrationResult.ddf`).
        grid: the grid the field is sampled on.
    """
    slicer = _slicer()
    ras = np.asarray(ddf, dtype=np.float64) @ FLIP.T  # each displacement vector to RAS
    image = _image_data(ras, 3)
    spacing_xyz = np.asarray(grid.spacing, dtype=np.float64)[::-1]
    image.SetSpacing(*spacing_xyz)
    matrix = ijk_to_ras(grid)
    image.SetOrigin(*matrix[:3, 3])
    transform = slicer.vtkOrientedGridTransform()
    direction = np.eye(4)
    direction[:3, :3] = matrix[:3, :3] / spacing_xyz  # the grid's axes in RAS
    transform.SetGridDirectionMatrix(_vtk_matrix(direction))
    transform.SetDisplacementGridData(image)
    transform.SetInterpolationModeToLinear()
    node = scene.AddNewNodeByClass("vtkMRMLGridTransformNode", name)
    node.SetAndObserveTransformFromParent(transform)
    return node


def register_nodes(
    fixed_node,
    moving_node,
    model: str = "ct",
    affine: bool | None = None,
    refine: int | None = None,
    device: str = "auto",
    progress=None,
    cancel=None,
) -> NodeRegistration:
    """Register ``moving_node`` onto ``fixed_node`` with the job of ``ctcolor register`` (`app.register_job`); the
    outputs are added to their scene (none when it fails).

    Args:
        fixed_node, moving_node: scalar volume nodes of one scene.
        model: ``"ct"`` (the project's CT weights) or the path of a SYMNet checkpoint.
        affine: rigid then affine pre-alignment (``--affine``); None takes the model card's default (on for the CT
            weights, off for an official checkpoint).
        refine: demons iterations at the fixed image's resolution (``--refine``; 0: the network alone); None takes
            the model card's default (refinement with the CT weights, none with an official checkpoint).
        device: ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"mps"``.
        progress: called as ``progress(done, total)``; ``total`` comes from the engine (it depends on the card).
        cancel: polled between progress steps; True stops the registration (`Cancelled`).

    The engine's quality warnings are in ``metrics["warnings"]`` (empty when the registration looks sound).

    Both volumes are registered where the scene shows them: a linear parent transform (a volume moved by hand in the
    Transforms module) is applied first, and the outputs lie in world coordinates, under no transform. To resample
    a moving volume that has a parent transform with the result, put that parent under ``transform``.

    Raises:
        InputError: nodes in different scenes, a node without image data, a vector volume, a node under a
            non-linear transform, and the engine's own input errors.
    """
    from ..app.register_job import RegisterRequest, checkerboard, register_job

    if fixed_node is None or moving_node is None:
        raise InputError("register_nodes needs a fixed and a moving volume node")
    scene = fixed_node.GetScene()
    if scene is None or moving_node.GetScene() is not scene:
        raise InputError(f"{_name(moving_node)}: the fixed and moving nodes are in different scenes")
    request = RegisterRequest.checked(model, affine, refine, device)
    fixed, moving = volume_from_node(fixed_node, world=True), volume_from_node(moving_node, world=True)
    result = register_job(fixed, moving, request, progress=progress, cancel=cancel).result
    name = _name(moving_node)
    return NodeRegistration(
        warped=node_from_volume(result.warped, scene, f"{name} warped"),
        transform=grid_transform_node(result.ddf, fixed, scene, f"{name} to {_name(fixed_node)}"),
        checkerboard=node_from_volume(checkerboard(fixed, result.warped, 20.0), scene, "checkerboard"),
        jacobian=node_from_volume(result.jacobian, scene, f"{name} Jacobian"),
        metrics=dict(result.metrics),
    )
