"""SYMNet: fast symmetric diffeomorphic registration (Mok and Chung, CVPR 2020), written for this project.

The network reads (fixed, moving) and predicts two stationary velocity fields: v_xy moves the fixed image X and
v_yx moves the moving image Y towards a half-way space. Integrating them (scaling and squaring) and composing the
halves gives the full fields in both directions, which are diffeomorphic and inverse-consistent by construction:

    F_AB = compose(int(v_xy), int(-v_yx))    warps the fixed image A onto the moving image B
    F_BA = compose(int(v_yx), int(-v_xy))    warps the moving image B onto the fixed image A

Fields follow `napari_ctcolor.models.diffeo`: (B, 3, D0, D1, D2) in voxels, channels (x, y, z) = array axes
(2, 1, 0). The module names (``eninput``, ``ec1``..``ec9``, ``dc1``..``dc10``, ``up1``..``up4``) match the official
PyTorch code, so its checkpoints load with ``strict=True``. Training loops and the losses live in
`napari_ctcolor.training` (`training.symnet_losses`).
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from napari_ctcolor.errors import InputError
from napari_ctcolor.models.diffeo import INTEGRATION_STEPS, compose, integrate_velocity

#: Velocities are softsign outputs in (-1, 1) scaled to at most this many voxels (official ``range_flow``).
RANGE_FLOW = 100.0
#: Four stride-2 levels: every spatial size must be a multiple of this.
SIZE_MULTIPLE = 16


def _conv(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    # Index 0 holds the weights, so the state-dict keys read "<name>.0.weight" as in the official checkpoint.
    return nn.Sequential(nn.Conv3d(in_channels, out_channels, 3, stride=stride, padding=1), nn.ReLU())


def _up(channels: int) -> nn.Sequential:
    return nn.Sequential(nn.ConvTranspose3d(channels, channels, 2, stride=2), nn.ReLU())


def _velocity_head(in_channels: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv3d(in_channels, 3, 5, padding=2, bias=False), nn.Softsign())


def _check_pair(fixed: torch.Tensor, moving: torch.Tensor) -> None:
    if fixed.ndim != 5 or fixed.shape[1] != 1:
        raise InputError(f"fixed must have shape (B, 1, D0, D1, D2), got {tuple(fixed.shape)}")
    if moving.shape != fixed.shape:
        raise InputError(f"moving must have the fixed image's shape {tuple(fixed.shape)}, got {tuple(moving.shape)}")
    if any(n % SIZE_MULTIPLE for n in fixed.shape[2:]):
        expected = tuple(-(-n // SIZE_MULTIPLE) * SIZE_MULTIPLE for n in fixed.shape[2:])
        raise InputError(
            f"SYMNet needs spatial sizes that are multiples of {SIZE_MULTIPLE}: got {tuple(fixed.shape[2:])}, "
            f"pad to {expected}"
        )


class SYMNet(nn.Module):
    """U-Net that maps a (fixed, moving) pair to the two half-way velocity fields v_xy and v_yx.

    Encoder: 3x3x3 conv + ReLU pairs, the first of each level with stride 2 (channels c, 2c, 4c, 8c, 16c -> 8c).
    Decoder: 2x2x2 transposed conv + ReLU, concatenation with the encoder level, two conv + ReLU. Two 5x5x5
    bias-free conv heads with softsign give v_xy and v_yx, scaled by ``range_flow`` voxels.

    Args:
        start_channel: channels of the first level (7 in the official OASIS checkpoint: 862,351 parameters).
        range_flow: largest velocity in voxels (100 in the official code).

    Example:
        ``v_xy, v_yx = SYMNet(7)(fixed, moving)`` with fixed, moving (1, 1, 160, 192, 224) in [0, 1].
    """

    def __init__(self, start_channel: int = 7, range_flow: float = RANGE_FLOW) -> None:
        super().__init__()
        c = start_channel
        self.start_channel = start_channel
        self.range_flow = range_flow
        self.eninput, self.ec1 = _conv(2, c), _conv(c, c)
        self.ec2, self.ec3 = _conv(c, 2 * c, stride=2), _conv(2 * c, 2 * c)
        self.ec4, self.ec5 = _conv(2 * c, 4 * c, stride=2), _conv(4 * c, 4 * c)
        self.ec6, self.ec7 = _conv(4 * c, 8 * c, stride=2), _conv(8 * c, 8 * c)
        self.ec8, self.ec9 = _conv(8 * c, 16 * c, stride=2), _conv(16 * c, 8 * c)
        self.up1, self.up2, self.up3, self.up4 = _up(8 * c), _up(4 * c), _up(2 * c), _up(2 * c)
        self.dc1, self.dc2 = _conv(16 * c, 8 * c), _conv(8 * c, 4 * c)
        self.dc3, self.dc4 = _conv(8 * c, 4 * c), _conv(4 * c, 2 * c)
        self.dc5, self.dc6 = _conv(4 * c, 4 * c), _conv(4 * c, 2 * c)
        self.dc7, self.dc8 = _conv(3 * c, 2 * c), _conv(2 * c, 2 * c)
        self.dc9, self.dc10 = _velocity_head(2 * c), _velocity_head(2 * c)

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Velocity fields of the pair.

        Args:
            fixed, moving: (B, 1, D0, D1, D2) normalised intensities, each size a multiple of 16.

        Returns:
            (v_xy, v_yx), each (B, 3, D0, D1, D2) in voxels, channels (x, y, z) = array axes (2, 1, 0).
        """
        _check_pair(fixed, moving)
        e0 = self.ec1(self.eninput(torch.cat((fixed, moving), dim=1)))
        e1 = self.ec3(self.ec2(e0))
        e2 = self.ec5(self.ec4(e1))
        e3 = self.ec7(self.ec6(e2))
        e4 = self.ec9(self.ec8(e3))
        d = self.dc2(self.dc1(torch.cat((self.up1(e4), e3), dim=1)))
        d = self.dc4(self.dc3(torch.cat((self.up2(d), e2), dim=1)))
        d = self.dc6(self.dc5(torch.cat((self.up3(d), e1), dim=1)))
        d = self.dc8(self.dc7(torch.cat((self.up4(d), e0), dim=1)))
        # The two 5x5x5 heads as one 6-channel convolution: the same products, but the 14-channel full-resolution
        # features are read once (1.8 s instead of 3.7 s on a 160x192x224 pair, 2 CPU cores).
        weight = torch.cat((self.dc9[0].weight, self.dc10[0].weight))
        v = F.softsign(F.conv3d(d, weight, padding=2)) * self.range_flow
        return v[:, :3], v[:, 3:]


@dataclass(frozen=True)
class SymmetricFields:
    """Full displacement fields of a registered pair, each (B, 3, D0, D1, D2) in voxels, channels (x, y, z).

    ``f_ba`` warps the moving image B onto the fixed image A: ``warp(moving, f_ba)``; it maps fixed point p to moving
    point p + f_ba(p), so it is the ``ddf`` of ``RegistrationResult`` (docs/architecture.md, "Core types"), in
    voxels before conversion to mm.
    ``f_ab`` warps the fixed image onto the moving one and is the ``inverse_ddf``.
    """

    f_ab: torch.Tensor
    f_ba: torch.Tensor


def symnet_forward_fields(
    model: SYMNet,
    fixed: torch.Tensor,
    moving: torch.Tensor,
    num_steps: int = INTEGRATION_STEPS,
    channels_last: bool = True,
) -> SymmetricFields:
    """Register ``moving`` to ``fixed``: network forward, batched integration and half-way composition.

    Call it under ``torch.inference_mode()`` for inference. The four fields v_xy, v_yx, -v_xy, -v_yx are integrated
    as one batch (shape (4B, 3, ...)).

    Args:
        model: a `SYMNet`, on the device and dtype of the images.
        fixed, moving: (B, 1, D0, D1, D2) normalised as the weights expect (min-max to [0, 1] for the official
            checkpoint), each size a multiple of 16.
        num_steps: squaring steps (7 in SYMNet).
        channels_last: run the network in ``torch.channels_last_3d`` (about twice as fast on CPU). The model's
            parameters are converted in place.

    Returns:
        `SymmetricFields` with f_ab and f_ba, (B, 3, D0, D1, D2) in voxels, channels (x, y, z).
    """
    _check_pair(fixed, moving)
    if channels_last:
        model.to(memory_format=torch.channels_last_3d)
        fixed = fixed.contiguous(memory_format=torch.channels_last_3d)
        moving = moving.contiguous(memory_format=torch.channels_last_3d)
    v_xy, v_yx = model(fixed, moving)
    # grid_sample is faster on contiguous (channels-first) fields.
    v = torch.cat((v_xy, v_yx, -v_xy, -v_yx), dim=0).contiguous()
    return half_way_fields(integrate_velocity(v, num_steps))


def half_way_fields(halves: torch.Tensor) -> SymmetricFields:
    """The full fields from the integrated halves: F_AB = int(v_xy) o int(-v_yx), F_BA = int(v_yx) o int(-v_xy).

    Args:
        halves: (4B, 3, D0, D1, D2) voxels, the integrals of v_xy, v_yx, -v_xy, -v_yx stacked in that order.
    """
    xy_half, yx_half, xy_half_inv, yx_half_inv = halves.chunk(4, dim=0)
    return SymmetricFields(f_ab=compose(xy_half, yx_half_inv), f_ba=compose(yx_half, xy_half_inv))


# --- checkpoints ---------------------------------------------------------------------------------------------------


def _expected_keys() -> set[str]:
    return set(SYMNet(start_channel=1).state_dict())


def is_symnet_state_dict(state_dict: Mapping[str, object]) -> bool:
    """True when ``state_dict`` has exactly the keys of SYMNet (the official checkpoints and ours)."""
    return set(state_dict) == _expected_keys()


def symnet_from_state_dict(state_dict: Mapping[str, torch.Tensor], source: str = "state dict") -> SYMNet:
    """Build a `SYMNet` whose start_channel is read from the tensor shapes, and load it strictly.

    ``eninput.0.weight`` has shape (start_channel, 2, 3, 3, 3).

    Args:
        state_dict: parameter name -> tensor, in the official key layout.
        source: the file name, for error messages.

    Raises:
        InputError: when the keys or shapes are not those of SYMNet.
    """
    keys = set(state_dict)
    expected = _expected_keys()
    if keys != expected:
        missing, unexpected = sorted(expected - keys), sorted(keys - expected)
        raise InputError(
            f"{source}: not a SYMNet checkpoint (missing keys {missing[:5]}, unexpected keys {unexpected[:5]})"
        )
    first = state_dict["eninput.0.weight"]
    if not isinstance(first, torch.Tensor) or first.ndim != 5 or tuple(first.shape[1:]) != (2, 3, 3, 3):
        shape = tuple(first.shape) if isinstance(first, torch.Tensor) else type(first).__name__
        raise InputError(f"{source}: eninput.0.weight must have shape (start_channel, 2, 3, 3, 3), got {shape}")
    model = SYMNet(start_channel=int(first.shape[0]))
    try:
        model.load_state_dict(dict(state_dict), strict=True)
    except RuntimeError as exc:
        reason = str(exc).splitlines()[1:2] or [str(exc)]
        raise InputError(
            f"{source}: SYMNet tensor shapes do not fit start_channel {first.shape[0]}: {reason[0].strip()}"
        ) from exc
    return model.eval()


def load_symnet_checkpoint(path: str | Path) -> SYMNet:
    """Load an official SYMNet ``.pth`` state dict (or one of ours in the same layout) on the CPU, in eval mode.

    The file is read with ``torch.load(..., weights_only=True)``: tensors only, no arbitrary pickled code.

    Example:
        ``model = load_symnet_checkpoint("../shared/data/symnet-oasis/SYMNet_neurite_oasis_smo30_update_80000.pth")``
        gives start_channel 7 and 862,351 parameters.

    Raises:
        InputError: when the file is missing, not a tensor-only checkpoint, or not SYMNet.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: checkpoint file not found")
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as exc:
        raise InputError(f"{path}: cannot read as a tensor-only PyTorch checkpoint ({type(exc).__name__})") from exc
    if not isinstance(state_dict, Mapping):
        raise InputError(f"{path}: expected a state dict (name -> tensor), got {type(state_dict).__name__}")
    return symnet_from_state_dict(state_dict, source=str(path))
