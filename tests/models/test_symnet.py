"""SYMNet and the diffeomorphic blocks: parity with the official inference, analytic cases, checkpoint loading."""

from __future__ import annotations

import math
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from napari_ctcolor.errors import InputError
from napari_ctcolor.models.diffeo import (
    compose,
    folding_fraction,
    integrate_velocity,
    inverse_consistency_error,
    jacobian_determinant,
    warp,
)
from napari_ctcolor.models.symnet import (
    SYMNet,
    is_symnet_state_dict,
    load_symnet_checkpoint,
    symnet_forward_fields,
    symnet_from_state_dict,
)
from napari_ctcolor.training.symnet_losses import (
    local_ncc_loss,
    magnitude_loss,
    negative_jacobian_loss,
    smoothness_loss,
)

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
OASIS = SHARED_DATA / "symnet-oasis"
CHECKPOINT = OASIS / "SYMNet_neurite_oasis_smo30_update_80000.pth"


def _require_oasis() -> None:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"../shared/data not found: expected {SHARED_DATA} beside the checkout")
    if not CHECKPOINT.is_file():
        pytest.skip(f"../shared/data has no official SYMNet checkpoint: expected {CHECKPOINT}")


def _grid_zyx(shape: tuple[int, int, int], dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Voxel coordinates (3, D0, D1, D2) in array-axis order (z, y, x)."""
    return torch.stack(torch.meshgrid(*[torch.arange(n, dtype=dtype) for n in shape], indexing="ij"))


def _smooth_velocity(shape: tuple[int, int, int], amplitude: float, seed: int = 0) -> torch.Tensor:
    """A smooth random velocity field (1, 3, D0, D1, D2): sums of low-frequency sines, max |v| ~ amplitude voxels."""
    gen = torch.Generator().manual_seed(seed)
    p = _grid_zyx(shape)
    channels = []
    for _ in range(3):
        k = torch.rand(3, generator=gen, dtype=torch.float64) * 2 * math.pi / torch.tensor(shape) * 1.5
        phase = torch.rand(1, generator=gen, dtype=torch.float64) * 2 * math.pi
        channels.append(torch.sin((k[:, None, None, None] * p).sum(0) + phase))
    return (amplitude * torch.stack(channels)).unsqueeze(0)


# --- parity with the official inference ----------------------------------------------------------------------------


def _load_minmax(path: Path) -> torch.Tensor:
    """As the official test script: nibabel, array axes as stored, min-max to [0, 1], float32, (1, 1, D0, D1, D2)."""
    nib = pytest.importorskip("nibabel")
    a = nib.load(path).get_fdata()
    return torch.from_numpy((a - a.min()) / (a.max() - a.min())).float()[None, None]


@pytest.mark.slow  # ~30 s on 2 CPU cores; still the key parity check, run in CI
@pytest.mark.numeric
def test_official_checkpoint_reproduces_reference_warped_image_and_flow():
    _require_oasis()
    nib = pytest.importorskip("nibabel")
    fixed = _load_minmax(OASIS / "image_A_full_size.nii.gz")
    moving = _load_minmax(OASIS / "image_B_full_size.nii.gz")
    reference_warped = nib.load(OASIS / "reference-warped-B-to-A.nii.gz").get_fdata().astype(np.float32)
    # Array axis 0 slab 72..88, (16, 192, 224, 3), channel c = displacement along array axis 2 - c.
    reference_flow = np.load(OASIS / "reference-flow-B-to-A-slab72-88.npy")
    model = load_symnet_checkpoint(CHECKPOINT)

    start = time.perf_counter()
    with torch.inference_mode():
        fields = symnet_forward_fields(model, fixed, moving)
        warped = warp(moving, fields.f_ba)[0, 0].numpy()
    seconds = time.perf_counter() - start

    flow = fields.f_ba[0, :, 72:88].permute(1, 2, 3, 0).numpy()
    warped_diff = float(np.abs(warped - reference_warped).max())
    flow_diff = float(np.abs(flow - reference_flow).max())
    print(
        f"\nSYMNet parity: max |warped - ref| = {warped_diff:.3g}, max |flow - ref| = {flow_diff:.3g} voxels, "
        f"{seconds:.1f} s for forward + 4 integrations + 2 compositions + warp"
    )
    assert warped.shape == reference_warped.shape == (160, 192, 224)
    assert warped_diff <= 1e-3
    assert flow_diff <= 1e-2


# --- analytic cases of the diffeomorphic blocks --------------------------------------------------------------------


def test_zero_velocity_integrates_to_zero_displacement_and_identity_warp():
    velocity = torch.zeros(2, 3, 8, 9, 10)
    ddf = integrate_velocity(velocity)
    image = torch.rand(2, 1, 8, 9, 10)
    assert torch.count_nonzero(ddf) == 0
    torch.testing.assert_close(warp(image, ddf), image, atol=1e-6, rtol=0)


def test_constant_velocity_integrates_to_same_translation_in_interior():
    shift = torch.tensor([1.5, -0.75, 2.25])  # voxels along x, y, z (array axes 2, 1, 0)
    velocity = shift.view(1, 3, 1, 1, 1).expand(1, 3, 28, 30, 32).clone()
    ddf = integrate_velocity(velocity)
    # Zeros padding shortens the field near the border, and each of the 7 squarings carries that inward by up to
    # |displacement| + 1 voxel (the trilinear stencil): the interior starts ceil(max |shift|) + 7 voxels in.
    m = 3 + 7
    interior = ddf[:, :, m:-m, m:-m, m:-m]
    torch.testing.assert_close(interior, velocity[:, :, m:-m, m:-m, m:-m], atol=1e-5, rtol=0)


def test_batched_integration_equals_one_field_at_a_time():
    v = torch.cat([_smooth_velocity((12, 14, 16), 2.0, seed=s) for s in range(4)]).float()
    batched = integrate_velocity(v)
    single = torch.cat([integrate_velocity(v[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(batched, single, atol=1e-6, rtol=0)


def test_composing_integrated_field_with_integrated_negative_is_near_identity():
    shape = (32, 32, 32)
    v = _smooth_velocity(shape, amplitude=1.0).float()  # wavelengths >= 21 voxels
    fields = integrate_velocity(torch.cat((v, -v)))
    residual = compose(fields[:1], fields[1:]).norm(dim=1)
    m = 4  # away from the border, where zeros padding makes the fields non-invertible
    interior_max = float(residual[:, m:-m, m:-m, m:-m].max())
    assert float(fields[0].abs().max()) > 0.5  # the field really moves things
    assert interior_max < 0.05, interior_max
    assert float(inverse_consistency_error(fields[:1], fields[1:])[0]) < 0.05


def test_compose_warps_like_first_field_then_second():
    # Trilinear interpolation is exact on a linear image, so both sides agree to rounding in the interior.
    shape = (16, 18, 20)
    p = _grid_zyx(shape)
    image = (0.3 * p[0] - 0.2 * p[1] + 0.1 * p[2])[None, None]
    f1 = _smooth_velocity(shape, 1.0, seed=1)
    f2 = _smooth_velocity(shape, 1.0, seed=2)
    m = 3
    once = warp(image, compose(f1, f2))[..., m:-m, m:-m, m:-m]
    twice = warp(warp(image, f1), f2)[..., m:-m, m:-m, m:-m]
    torch.testing.assert_close(once, twice, atol=1e-9, rtol=0)


def test_jacobian_of_affine_displacement_equals_det_of_identity_plus_matrix():
    a = torch.tensor([[0.10, -0.20, 0.05], [0.30, 0.15, -0.10], [-0.05, 0.25, -0.30]], dtype=torch.float64)
    p = _grid_zyx((9, 10, 11))
    u_zyx = torch.einsum("ij,j...->i...", a, p)  # u(p) = A p in array-axis order
    ddf = u_zyx.flip(0)[None]  # channels (x, y, z)
    jac = jacobian_determinant(ddf)
    expected = float(torch.linalg.det(torch.eye(3, dtype=torch.float64) + a))
    assert jac.shape == (1, 9, 10, 11)
    torch.testing.assert_close(jac, torch.full_like(jac, expected), atol=1e-12, rtol=0)


def test_folding_fraction_is_zero_for_smooth_field_and_positive_for_folding_field():
    shape = (16, 16, 32)
    smooth = integrate_velocity(_smooth_velocity(shape, amplitude=1.0).float())
    x = _grid_zyx(shape)[2]
    # u_x = a sin(2 pi x / L) has d(x + u_x)/dx = 1 + a 2 pi / L cos(...) < 0 where the cosine is near -1.
    folding = torch.zeros(1, 3, *shape, dtype=torch.float64)
    folding[0, 0] = 4.0 * torch.sin(2 * math.pi * x / 16)
    assert float(folding_fraction(smooth)[0]) == 0.0
    fraction = float(folding_fraction(folding)[0])
    assert 0.05 < fraction < 0.95, fraction


def test_nearest_label_warp_keeps_label_values_exactly():
    gen = torch.Generator().manual_seed(3)
    values = torch.tensor([0, 3, 17, 117, 70_000], dtype=torch.int32)
    labels = values[torch.randint(0, len(values), (1, 1, 12, 13, 14), generator=gen)]
    ddf = _smooth_velocity((12, 13, 14), amplitude=2.3).float()
    warped = warp(labels, ddf, mode="nearest")
    assert warped.dtype == torch.int32 and warped.shape == labels.shape
    assert set(torch.unique(warped).tolist()) <= set(values.tolist())
    assert torch.equal(warp(labels, torch.zeros_like(ddf), mode="nearest"), labels)


def test_warp_matches_monai_warp_given_reversed_channels():
    from monai.networks.blocks import Warp

    image = torch.rand(2, 2, 10, 11, 12)
    ddf = torch.cat([_smooth_velocity((10, 11, 12), 3.0, seed=s) for s in (4, 5)]).float()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Using PyTorch native grid_sample" without MONAI's C++ extension
        monai_warp = Warp(mode="bilinear", padding_mode="zeros")
    # MONAI's channel i is the displacement along array axis i (z, y, x); ours is (x, y, z).
    torch.testing.assert_close(warp(image, ddf), monai_warp(image, ddf.flip(1)), atol=1e-5, rtol=0)


def test_mismatched_shapes_raise_input_error_naming_both_shapes():
    ddf = torch.zeros(1, 3, 8, 8, 8)
    with pytest.raises(InputError, match=r"\(1, 3, 8, 8, 8\).*\(1, 1, 8, 8, 9\)"):
        warp(torch.zeros(1, 1, 8, 8, 9), ddf)
    with pytest.raises(InputError, match=r"\(1, 3, 8, 8, 8\).*\(1, 3, 8, 8, 9\)"):
        compose(ddf, torch.zeros(1, 3, 8, 8, 9))
    with pytest.raises(InputError, match=r"\(1, 2, 8, 8, 8\)"):
        integrate_velocity(torch.zeros(1, 2, 8, 8, 8))
    with pytest.raises(InputError, match=r"\(1, 1, 16, 16, 16\).*\(1, 1, 16, 16, 32\)"):
        SYMNet(2)(torch.zeros(1, 1, 16, 16, 16), torch.zeros(1, 1, 16, 16, 32))
    with pytest.raises(InputError, match=r"multiples of 16.*\(16, 16, 20\).*\(16, 16, 32\)"):
        SYMNet(2)(torch.zeros(1, 1, 16, 16, 20), torch.zeros(1, 1, 16, 16, 20))


# --- network, checkpoints and losses -------------------------------------------------------------------------------


def test_symnet_outputs_two_velocity_fields_bounded_by_range_flow():
    torch.manual_seed(0)
    model = SYMNet(start_channel=3).eval()
    fixed, moving = torch.rand(2, 1, 16, 32, 16), torch.rand(2, 1, 16, 32, 16)
    with torch.inference_mode():
        v_xy, v_yx = model(fixed, moving)
        fields = symnet_forward_fields(model, fixed, moving)
    assert v_xy.shape == v_yx.shape == fields.f_ab.shape == fields.f_ba.shape == (2, 3, 16, 32, 16)
    assert float(v_xy.abs().max()) < 100.0 and float(v_yx.abs().max()) < 100.0


def test_official_checkpoint_loads_strictly_with_start_channel_7():
    _require_oasis()
    model = load_symnet_checkpoint(CHECKPOINT)
    assert model.start_channel == 7
    assert sum(p.numel() for p in model.parameters()) == 862_351
    state = torch.load(CHECKPOINT, map_location="cpu", weights_only=True)
    assert is_symnet_state_dict(state)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_start_channel_is_inferred_from_tensor_shapes():
    state = SYMNet(start_channel=4).state_dict()
    assert symnet_from_state_dict(state).start_channel == 4


def test_checkpoint_with_wrong_key_set_raises_input_error(tmp_path):
    state = SYMNet(start_channel=2).state_dict()
    state["decoder.extra.weight"] = state.pop("dc10.0.weight")
    path = tmp_path / "not_symnet.pth"
    torch.save(state, path)
    assert not is_symnet_state_dict(state)
    with pytest.raises(InputError, match=r"not_symnet\.pth.*not a SYMNet checkpoint.*dc10\.0\.weight"):
        load_symnet_checkpoint(path)


def test_checkpoint_with_inconsistent_shapes_raises_input_error():
    state = SYMNet(start_channel=2).state_dict()
    state["ec1.0.weight"] = torch.zeros(3, 2, 3, 3, 3)
    with pytest.raises(InputError, match="start_channel 2"):
        symnet_from_state_dict(state, source="bad.pth")


def test_missing_checkpoint_raises_input_error(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_symnet_checkpoint(tmp_path / "absent.pth")


def test_losses_are_zero_or_minus_one_on_their_ideal_inputs():
    torch.manual_seed(0)
    image = F.avg_pool3d(torch.rand(1, 1, 20, 20, 20), 3, stride=1, padding=1)
    # A pure scale: an offset would break linearity in the zero-padded border windows (as in the official NCC).
    assert float(local_ncc_loss(image, 2.0 * image)) == pytest.approx(-1.0, abs=1e-3)
    noise = torch.rand(1, 1, 20, 20, 20) - 0.5  # zero mean, so the zero padding adds no correlation
    assert float(local_ncc_loss(image - image.mean(), noise)) > -0.1
    constant = torch.full((1, 3, 8, 8, 8), 2.5)
    assert float(smoothness_loss(constant)) == 0.0
    assert float(negative_jacobian_loss(torch.zeros(1, 3, 8, 8, 8))) == 0.0
    folding = torch.zeros(1, 3, 8, 8, 8)
    folding[0, 0] = -2.0 * _grid_zyx((8, 8, 8), torch.float32)[2]  # x -> -x: det J = -1
    assert float(negative_jacobian_loss(folding)) == pytest.approx(1.0)
    assert float(magnitude_loss(constant, -constant)) == 0.0
    assert float(magnitude_loss(constant, torch.zeros_like(constant))) == pytest.approx(2.5)


@pytest.mark.parametrize("shape", [(4, 3, 12, 14, 16), (1, 3, 1, 10, 12), (2, 3, 6, 1, 9)])
def test_cpu_kernel_integrates_and_composes_as_grid_sample(shape, monkeypatch):
    """The numba pass that integrate_velocity and compose use on the CPU at inference against grid_sample (the
    training path's arithmetic): displacements of several voxels that leave the volume (zeros outside) and singleton
    axes. Same float32 arithmetic in another order: 1e-4 voxel after 7 squarings of a smooth field."""
    import napari_ctcolor.models.diffeo as diffeo

    generator = torch.Generator().manual_seed(7)
    velocity = F.interpolate(
        torch.randn(shape[0], 3, 3, 3, 3, generator=generator) * 6.0, size=shape[2:], mode="trilinear"
    )
    f2 = velocity.flip(0) * 0.5
    monkeypatch.setattr(diffeo, "KERNEL_MIN_VOXELS", 0)  # these small fields would otherwise take grid_sample
    with torch.inference_mode():
        fast = diffeo.integrate_velocity(velocity), diffeo.compose(velocity, f2)
        monkeypatch.setattr(diffeo, "_cpu_kernel", lambda field, padding: False)
        slow = diffeo.integrate_velocity(velocity), diffeo.compose(velocity, f2)
    for a, b in zip(fast, slow, strict=True):
        assert a.shape == b.shape and float((a - b).abs().max()) < 1e-4
    assert float(fast[0].abs().max()) > 3.0  # the fields do move by voxels


def test_cpu_kernel_only_where_its_load_pays():
    """numba's one-time load (about 0.45 s) pays only on large fields: a 3 mm abdomen's four fields take grid_sample,
    OASIS's four the kernel."""
    import napari_ctcolor.models.diffeo as diffeo

    assert not diffeo._cpu_kernel(torch.empty(4, 3, 30, 101, 122), "zeros")
    assert diffeo._cpu_kernel(torch.empty(4, 3, 160, 192, 224), "zeros")
