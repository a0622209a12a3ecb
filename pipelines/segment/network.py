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


def build(arch: dict[str, Any]) -> nn.Module:
    """A 3D residual U-Net (encoder-decoder with skip connections), one logit channel."""
    if arch.get("name") != "monai.UNet":
        raise ValueError(f"unknown architecture {arch.get('name')!r}")
    return UNet(
        spatial_dims=3,
        in_channels=1,
        out_channels=1,
        channels=tuple(arch["channels"]),
        strides=tuple(arch["strides"]),
        num_res_units=int(arch["num_res_units"]),
        norm=arch["norm"],
    )
