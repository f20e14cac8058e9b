"""CT colorizers: MONAI U-Nets that predict, per pixel, probabilities over colour classes (never L*).

The classes are TotalSegmentator structures and groups of them (`napari_ctcolor.palettes.color_class`) plus HU tissue
classes for voxels no structure covers (air, lung, fat, soft tissue, contrast blood, bone). A palette gives each class
a colour; the engine's a*, b* are the probability-weighted palette a*, b*, so the palette is chosen at inference,
without retraining, and the probabilities also say what a colour stands for.

Colour is low-frequency, so both models work at a reduced in-plane resolution: the slice is area-averaged by an
integer factor chosen so that the network's pixels are about ``chroma_mm`` wide (3.5 mm: a 512x512 slice at 0.98 mm
is seen as 128x128), and the engine upsamples the colour back to full resolution guided by the full-resolution CT,
where the luminance comes unchanged from the windowed CT. Fixing the pixel size in mm also means organs have the same
size in pixels whatever the scanner's field of view. This is the reasoning of chroma subsampling in video and JPEG,
and it makes the network ~16x cheaper.

- 2D (2.5D): input = ``context`` neighbouring slices x ``len(windows)`` windows as channels.
- 3D: input = ``len(windows)`` channels of a (D, H, W) patch, run with MONAI's sliding-window inferer.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from ..windowing import window_tensor


@dataclass
class ColorizerConfig:
    """Architecture and input definition of a colorizer; stored in the model card and the weights' metadata."""

    dims: Literal[2, 3] = 2
    windows: list[tuple[float, float]] = field(default_factory=lambda: [(-600, 1500), (40, 400), (400, 1800)])
    context: int = 3  # 2D only: neighbouring slices (odd)
    chroma_mm: float = 3.5  # in-plane pixel size the network works at
    channels: tuple[int, ...] = (32, 64, 128, 256)
    strides: tuple[int, ...] = (2, 2, 2)
    num_res_units: int = 1
    classes: tuple[str, ...] = ()  # colour classes, in the order of the network's output channels
    # Features the U-Net's top level gives a 1x1 classifier (0: the U-Net outputs the class logits itself). Its
    # top level runs at the network's full resolution, so 3x3 convolutions into ~40 class channels there cost more
    # than the rest of the network; a narrow head makes the 2D model about 2x faster.
    head: int = 0
    # Every slice reaches the network in the radiological orientation, whatever order the file stored it in
    # (`engines.orientation.AxialView`), in training and at inference; False: as stored (older cards).
    canonical: bool = False

    def __post_init__(self) -> None:
        self.windows = [tuple(float(v) for v in w) for w in self.windows]
        self.classes = tuple(str(c) for c in self.classes)
        if len(self.classes) < 2 or len(set(self.classes)) != len(self.classes):
            raise InputError(f"a colorizer needs at least two distinct colour classes, got {list(self.classes)}")
        self.channels = tuple(int(c) for c in self.channels)
        self.strides = tuple(int(s) for s in self.strides)
        self.head = int(self.head)
        if self.head < 0:
            raise InputError(f"colorizer head must be >= 0 features, got {self.head}")
        if self.dims not in (2, 3):
            raise InputError(f"colorizer dims must be 2 or 3, got {self.dims}")
        if self.dims == 2 and (self.context < 1 or self.context % 2 == 0):
            raise InputError(f"2D colorizer context must be an odd number of slices, got {self.context}")

    @property
    def in_channels(self) -> int:
        return len(self.windows) * (self.context if self.dims == 2 else 1)

    @property
    def net_multiple(self) -> int:
        """The network's in-plane sizes must be multiples of this (its total downsampling)."""
        m = 1
        for s in self.strides:
            m *= s
        return m

    def factor_for(self, pixel_mm: float) -> int:
        """In-plane downsampling factor for a slice with ``pixel_mm`` pixels (>= 1)."""
        return max(1, round(self.chroma_mm / pixel_mm))

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ColorizerConfig:
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


class Colorizer(nn.Module):
    """Colour-class logits from windowed CT at reduced resolution.

    forward(x):
        x: 2D (B, context * n_windows, h, w) or 3D (B, n_windows, d, h, w): grey in [0, 1] from `prepare_input`,
           already at the reduced resolution; h, w multiples of prod(strides).
        returns: (B, K, h, w) or (B, K, d, h, w) logits over the K = len(config.classes) colour classes.
    """

    def __init__(self, config: ColorizerConfig, monai: bool = False) -> None:
        """``monai``: MONAI's own UNet and Convolution blocks (training); else their rebuild under the same module
        names (`_unet`: the same state dict, without importing MONAI's 2-3 s of subpackages at inference)."""
        super().__init__()
        self.config = config
        if monai:
            from monai.networks.blocks import Convolution
            from monai.networks.nets import UNet
        else:
            from ._unet import Convolution, UNet
        self.unet = UNet(
            spatial_dims=config.dims,
            in_channels=config.in_channels,
            out_channels=config.head or len(config.classes),
            channels=config.channels,
            strides=config.strides,
            num_res_units=config.num_res_units,
        )
        # MONAI's UNet ends without an activation: PReLU, then the 1x1 classifier (MONAI's own blocks).
        self.head = (
            nn.Sequential(
                nn.PReLU(),
                Convolution(config.dims, config.head, len(config.classes), kernel_size=1, conv_only=True),
            )
            if config.head
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        expected = self.config.dims + 2
        if x.ndim != expected or x.shape[1] != self.config.in_channels:
            raise InputError(
                f"colorizer expects (B, {self.config.in_channels}, {'d, ' if self.config.dims == 3 else ''}h, w), "
                f"got {tuple(x.shape)}"
            )
        return self.head(self.unet(x))


def downsample_hu(hu: torch.Tensor, factor: int) -> torch.Tensor:
    """Area-average the last two (in-plane) axes by ``factor``: (..., H, W) -> (..., H/factor, W/factor)."""
    if factor == 1:
        return hu
    lead = hu.shape[:-2]
    flat = hu.reshape(-1, 1, *hu.shape[-2:])
    return F.avg_pool2d(flat, factor).reshape(*lead, hu.shape[-2] // factor, hu.shape[-1] // factor)


def prepare_input(small_hu: torch.Tensor, config: ColorizerConfig) -> torch.Tensor:
    """Network input from HU already reduced in-plane (`downsample_hu` by `ColorizerConfig.factor_for`).

    Args:
        small_hu: 2D model: (B, context, h, w), a slice and its neighbours in z order; 3D model: (B, d, h, w).
            float HU; h and w multiples of ``config.net_multiple``.
    Returns:
        2D: (B, context * n_windows, h, w); 3D: (B, n_windows, d, h, w), grey in [0, 1]. Channels are window-major:
        all context slices in the first window, then the second window, ...
    """
    if small_hu.ndim != 4:
        raise InputError(f"prepare_input expects (B, slices, h, w) HU, got {tuple(small_hu.shape)}")
    if small_hu.shape[-1] % config.net_multiple or small_hu.shape[-2] % config.net_multiple:
        raise InputError(f"size {tuple(small_hu.shape[-2:])} is not a multiple of {config.net_multiple}; pad first")
    if config.dims == 2 and small_hu.shape[1] != config.context:
        raise InputError(f"2D colorizer needs {config.context} context slices, got {small_hu.shape[1]}")
    grey = [window_tensor(small_hu.float(), c, w) for c, w in config.windows]
    return torch.cat(grey, dim=1) if config.dims == 2 else torch.stack(grey, dim=1)


def pad_to_multiple(size: int, multiple: int) -> tuple[int, int]:
    """(before, after) padding that brings ``size`` to the next multiple of ``multiple``, split evenly."""
    total = (-size) % multiple
    return total // 2, total - total // 2


def context_indices(n_slices: int, context: int) -> torch.Tensor:
    """(n_slices, context) slice indices of each slice's neighbourhood, clamped at the volume's ends."""
    half = context // 2
    offsets = torch.arange(-half, half + 1)
    return (torch.arange(n_slices)[:, None] + offsets[None]).clamp_(0, n_slices - 1)
