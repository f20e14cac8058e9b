"""MONAI's U-Net (`monai.networks.nets.UNet`: residual units or plain convolutions, instance norm, PReLU, no dropout)
rebuilt from torch modules under the same module names, so the same state dict loads into either.

Why by hand: importing ``monai`` imports every MONAI subpackage (its ``__init__`` loads them all: transforms, data,
apps, and through them matplotlib and pandas), 2.0-3.2 s on 2 cores, more than torch itself; every ``ctcolor
colorize`` and the first colorize in napari paid it for one network definition. Training keeps MONAI's own
definition (`Colorizer` with ``monai=True``); tests/models/test_colorizer_model.py checks that both give the same
state dict keys and shapes and the same outputs within float32 tolerance, in 2D and 3D.

The structure (MONAI 1.x, `UNet._create_block`): each level is ``Sequential(down, SkipConnection(inner), up)``;
``down`` is a residual unit with the level's stride; the innermost level is a residual unit of stride 1; ``up`` is
a transposed convolution (kernel 3, output padding stride - 1) with norm and activation, then a residual unit of
stride 1 whose last convolution is bare at the top level. With ``num_res_units=0`` each residual unit is a single
convolution with norm and activation, and ``up`` is the transposed convolution alone (bare at the top level). A
residual unit adds its convolutions' output to a shortcut: identity, or a convolution (kernel 3 with the stride,
else 1) where the stride or the channels change.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_CONV_T = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
_NORM = {1: nn.InstanceNorm1d, 2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}


class Convolution(nn.Sequential):
    """MONAI's ``Convolution`` block: ``conv`` (padding kernel // 2), then ``adn`` (instance norm ``N``, PReLU
    ``A``) unless ``conv_only``."""

    def __init__(
        self,
        dims: int,
        in_channels: int,
        out_channels: int,
        strides: int = 1,
        kernel_size: int = 3,
        transposed: bool = False,
        conv_only: bool = False,
    ) -> None:
        super().__init__()
        padding = (kernel_size - 1) // 2
        if transposed:
            conv = _CONV_T[dims](in_channels, out_channels, kernel_size, strides, padding, output_padding=strides - 1)
        else:
            conv = _CONV[dims](in_channels, out_channels, kernel_size, strides, padding)
        self.add_module("conv", conv)
        if not conv_only:
            adn = nn.Sequential()
            adn.add_module("N", _NORM[dims](out_channels))
            adn.add_module("A", nn.PReLU())
            self.add_module("adn", adn)


class ResidualUnit(nn.Module):
    """MONAI's ``ResidualUnit``: ``subunits`` convolutions (``unit0`` with the stride) plus a shortcut."""

    def __init__(
        self,
        dims: int,
        in_channels: int,
        out_channels: int,
        strides: int,
        subunits: int,
        last_conv_only: bool = False,
    ) -> None:
        super().__init__()
        self.conv = nn.Sequential()
        channels, stride = in_channels, strides
        for k in range(max(1, subunits)):
            only = last_conv_only and k == max(1, subunits) - 1
            self.conv.add_module(f"unit{k}", Convolution(dims, channels, out_channels, stride, conv_only=only))
            channels, stride = out_channels, 1
        if strides != 1 or in_channels != out_channels:
            kernel = 3 if strides != 1 else 1
            self.residual: nn.Module = _CONV[dims](in_channels, out_channels, kernel, strides, (kernel - 1) // 2)
        else:
            self.residual = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) + self.residual(x)


class SkipConnection(nn.Module):
    """``cat([x, submodule(x)], dim=1)``, as MONAI's ``SkipConnection``."""

    def __init__(self, submodule: nn.Module) -> None:
        super().__init__()
        self.submodule = submodule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.submodule(x)], dim=1)


class UNet(nn.Module):
    """``monai.networks.nets.UNet(spatial_dims, in_channels, out_channels, channels, strides, num_res_units)`` with
    MONAI's defaults otherwise (kernel 3, instance norm, PReLU, no dropout)."""

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        channels: Sequence[int],
        strides: Sequence[int],
        num_res_units: int,
    ) -> None:
        super().__init__()
        if len(channels) < 2 or len(strides) < len(channels) - 1:
            raise ValueError("the U-Net needs at least two levels and a stride for each level below the top")
        self.dims, self.units = spatial_dims, num_res_units
        self.model = self._block(in_channels, out_channels, list(channels), list(strides), top=True)

    def _block(self, inc: int, outc: int, channels: list[int], strides: list[int], top: bool) -> nn.Module:
        c, s = channels[0], strides[0]
        if len(channels) > 2:
            inner = self._block(c, c, channels[1:], strides[1:], top=False)
            upc = 2 * c
        else:
            inner = self._down(c, channels[1], 1)
            upc = c + channels[1]
        up: nn.Module = Convolution(self.dims, upc, outc, s, transposed=True, conv_only=top and not self.units)
        if self.units:
            up = nn.Sequential(up, ResidualUnit(self.dims, outc, outc, 1, 1, last_conv_only=top))
        return nn.Sequential(self._down(inc, c, s), SkipConnection(inner), up)

    def _down(self, inc: int, outc: int, strides: int) -> nn.Module:
        if self.units:
            return ResidualUnit(self.dims, inc, outc, strides, self.units)
        return Convolution(self.dims, inc, outc, strides)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)
