"""Inference: an MR image in, a tumour mask on the same grid out.

:class:`Segmenter` loads a model folder (card checked, weights checksummed),
then for each image: coarse pass on the whole field of view at 5 mm, box
``margin_mm`` around the tumour it finds, fine pass in that box with
sliding-window inference, probabilities resampled back onto the input grid,
and post-processing (plausible components kept, holes filled). CUDA with
automatic mixed precision when available, else CPU.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch
from monai.inferers.utils import sliding_window_inference

from pipelines.segment import network
from pipelines.segment.card import ModelError, load_card
from pipelines.segment.prep import box_around, crop, normalise, to_spacing


def pick_device(requested: str = "auto") -> torch.device:
    """``auto``: CUDA when a GPU is visible, else CPU. ``cuda`` without a GPU is an error."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise ModelError("--device cuda asked for, but no CUDA device is visible")
    if requested not in ("cpu", "cuda"):
        raise ModelError(f"unknown device {requested!r} (auto, cpu or cuda)")
    return torch.device(requested)


def postprocess(mask: sitk.Image, *, keep_fraction: float = 0.1) -> sitk.Image:
    """Keep the largest component and any at least ``keep_fraction`` of its size; fill holes.

    Sarcomas are one mass, occasionally with satellite nodules; specks far
    smaller than the main mass are false positives. Holes (necrotic cores the
    network left out) are filled in 3D and then slice by slice.
    """
    labels = sitk.RelabelComponent(sitk.ConnectedComponent(mask > 0), sortByObjectSize=True)
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(labels)
    if not stats.GetLabels():
        empty: sitk.Image = sitk.Cast(mask > 0, sitk.sitkUInt8)
        return empty
    largest = stats.GetNumberOfPixels(1)
    keep = [
        lab for lab in stats.GetLabels() if stats.GetNumberOfPixels(lab) >= keep_fraction * largest
    ]
    kept = np.isin(sitk.GetArrayFromImage(labels), keep).astype(np.uint8)
    out = sitk.GetImageFromArray(kept)
    out.CopyInformation(mask)
    out = sitk.BinaryFillhole(out)
    arr = sitk.GetArrayFromImage(out)
    for k in range(arr.shape[0]):  # axial holes that touch the slab's top or bottom
        arr[k] = sitk.GetArrayFromImage(sitk.BinaryFillhole(sitk.GetImageFromArray(arr[k])))
    filled = sitk.GetImageFromArray(arr.astype(np.uint8))
    filled.CopyInformation(mask)
    return filled


@dataclass
class Result:
    """A segmentation with what it took: the mask on the input grid, timings, and the box used."""

    mask: sitk.Image
    probability: sitk.Image
    seconds: dict[str, float] = field(default_factory=dict)
    box: tuple[tuple[int, int, int], tuple[int, int, int]] | None = None
    located: bool = True

    @property
    def volume_ml(self) -> float:
        """Tumour volume in millilitres."""
        voxel = float(np.prod(self.mask.GetSpacing())) / 1000
        return float(sitk.GetArrayViewFromImage(self.mask).sum()) * voxel


def predict(
    net: torch.nn.Module, array: np.ndarray, patch: list[int], device: torch.device
) -> np.ndarray:
    """Sigmoid probabilities over a (z, y, x) array by sliding windows of ``patch`` (x, y, z).

    Gaussian-weighted overlap of 25 %; autocast (AMP) on CUDA.
    """
    roi = (int(patch[2]), int(patch[1]), int(patch[0]))  # torch's (D, H, W) is (z, y, x)
    x = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None, None].to(device)
    with (
        torch.inference_mode(),
        torch.autocast(device_type=device.type, enabled=device.type == "cuda"),
    ):
        logits = sliding_window_inference(
            x, roi, sw_batch_size=4, predictor=net, overlap=0.25, mode="gaussian"
        )
    assert isinstance(logits, torch.Tensor)
    out: np.ndarray = torch.sigmoid(logits.float())[0, 0].cpu().numpy()
    return out


class Segmenter:
    """A loaded model: :meth:`segment` turns an image into a tumour mask."""

    def __init__(self, model_dir: Path, device: str = "auto") -> None:
        """Load the card and both networks; refuses weights whose checksum differs."""
        self.model_dir = model_dir
        self.card: dict[str, Any] = load_card(model_dir)
        self.device = pick_device(device)
        self.nets: dict[str, torch.nn.Module] = {}
        for stage in ("coarse", "fine"):
            arch = self.card["architecture"][stage]
            net = network.build(arch)
            path = model_dir / self.card["weights"][stage]["file"]
            state = torch.load(path, map_location="cpu", weights_only=True)
            net.load_state_dict(state)
            self.nets[stage] = net.to(self.device).eval()

    @property
    def model_id(self) -> str:
        """``id`` and ``version`` from the card, e.g. ``sarcnode-seg 1.0.0``."""
        return f"{self.card.get('id')} {self.card.get('version')}"

    def _predict(self, stage: str, array: np.ndarray) -> np.ndarray:
        patch = self.card["architecture"][stage]["patch"]
        return predict(self.nets[stage], array, patch, self.device)

    def segment(self, image: sitk.Image) -> Result:
        """Tumour mask (uint8 0/1) on ``image``'s grid, with per-step seconds."""
        seconds: dict[str, float] = {}
        t0 = time.perf_counter()
        image = sitk.Cast(image, sitk.sitkFloat32)
        arch_c, arch_f = self.card["architecture"]["coarse"], self.card["architecture"]["fine"]
        coarse_img = to_spacing(image, arch_c["spacing_mm"])
        coarse_arr = normalise(sitk.GetArrayFromImage(coarse_img))
        seconds["preprocess"] = time.perf_counter() - t0

        t1 = time.perf_counter()
        coarse_prob = self._predict("coarse", coarse_arr)
        coarse_mask = sitk.GetImageFromArray((coarse_prob >= 0.5).astype(np.uint8))
        coarse_mask.CopyInformation(coarse_img)
        if np.any(coarse_prob >= 0.5):
            coarse_mask = postprocess(coarse_mask, keep_fraction=0.2)
        box = box_around(coarse_mask, image, float(arch_f["margin_mm"]))
        located = box is not None
        if box is None:  # nothing found at 5 mm: let the fine model look everywhere
            box = ((0, 0, 0), image.GetSize())
        region = crop(image, box)
        fine_img = to_spacing(region, arch_f["spacing_mm"])
        fine_prob = self._predict("fine", normalise(sitk.GetArrayFromImage(fine_img)))
        seconds["inference"] = time.perf_counter() - t1

        t2 = time.perf_counter()
        prob = sitk.GetImageFromArray(fine_prob.astype(np.float32))
        prob.CopyInformation(fine_img)
        prob = sitk.Resample(prob, image, sitk.Transform(), sitk.sitkLinear, 0.0)
        mask = postprocess(sitk.Cast(prob >= 0.5, sitk.sitkUInt8))
        seconds["postprocess"] = time.perf_counter() - t2
        return Result(mask=mask, probability=prob, seconds=seconds, box=box, located=located)
