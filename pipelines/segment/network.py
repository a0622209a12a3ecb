"""The two networks, built from the architecture block of a model card."""

from __future__ import annotations

from typing import Any

from monai.networks.nets.unet import UNet
from torch import nn

#: Defaults written into a new card; a card carries its own copy.
COARSE_ARCH: dict[str, Any] = {
    "name": "monai.UNet",
    "channels": [16, 32, 64, 128],
    "strides": [2, 2, 2],
    "num_res_units": 1,
    "norm": "instance",
    "spacing_mm": [5.0, 5.0, 5.0],
    "patch": [48, 48, 48],
}
FINE_ARCH: dict[str, Any] = {
    "name": "monai.UNet",
    "channels": [16, 32, 64, 128],
    "strides": [2, 2, 2],
    "num_res_units": 2,
    "norm": "instance",
    "spacing_mm": [1.5, 1.5, 3.0],
    "patch": [80, 80, 32],
    "margin_mm": 50.0,
}


#: The 2.5D candidate: a 2D residual U-Net on axial slices at 1 mm, each slice
#: seen with its neighbours as channels (``context`` slices, odd).
FINE_ARCH_25D: dict[str, Any] = {
    "name": "monai.UNet",
    "context": 3,
    "channels": [16, 32, 64, 128, 192],
    "strides": [2, 2, 2, 2],
    "num_res_units": 2,
    "norm": "instance",
    "spacing_mm": [1.0, 1.0, 3.27],
    "patch": [128, 128],
    "margin_mm": 50.0,
}


def context(arch: dict[str, Any]) -> int:
    """Neighbouring slices fed as channels (2.5D), or 0 for a 3D network."""
    return int(arch.get("context") or 0)


def build(arch: dict[str, Any]) -> nn.Module:
    """A residual U-Net (encoder-decoder with skip connections), one logit channel.

    3D on (z, y, x) patches, or 2D on axial slices with ``context``
    neighbouring slices as input channels when the architecture names one.
    """
    if arch.get("name") != "monai.UNet":
        raise ValueError(f"unknown architecture {arch.get('name')!r}")
    k = context(arch)
    return UNet(
        spatial_dims=2 if k else 3,
        in_channels=k or 1,
        out_channels=1,
        channels=tuple(arch["channels"]),
        strides=tuple(arch["strides"]),
        num_res_units=int(arch["num_res_units"]),
        norm=arch["norm"],
    )
