"""Inference: an MR image in, a tumour mask on the same grid out, with how far to trust it.

:class:`Segmenter` loads a model folder (card checked, weights checksummed),
then for each image: input checks (:mod:`.quality`: a constant or noise-like
image is refused before any network runs), coarse pass on the whole field of
view at 5 mm, box ``margin_mm`` around the tumour it finds, fine pass in that
box by every ensemble member (or the sequence's own path, ``ensemble.by_sequence``)
under mirror test-time augmentation
(sliding-window inference), the mean probability resampled back onto the
input grid, post-processing (components kept by the rule the card's
cross-validation chose, holes filled), and a quality estimate: the agreement
between the mirrored views, with the ``review`` flag below the card's
threshold. CUDA with automatic mixed precision when available, else CPU.
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
from pipelines.segment.card import CARD_FILE, ModelError, check_inference_card, load_card
from pipelines.segment.prep import box_around, crop, normalise, to_spacing
from pipelines.segment.quality import Quality, agreement, check_input


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
    """A segmentation with what it took: the mask on the input grid, timings, box and quality."""

    mask: sitk.Image
    probability: sitk.Image
    seconds: dict[str, float] = field(default_factory=dict)
    box: tuple[tuple[int, int, int], tuple[int, int, int]] | None = None
    located: bool = True
    quality: Quality | None = None
    members: tuple[str, ...] = ()  # the card's weights entries that drew the mask

    @property
    def volume_ml(self) -> float:
        """Tumour volume in millilitres."""
        voxel = float(np.prod(self.mask.GetSpacing())) / 1000
        return float(sitk.GetArrayViewFromImage(self.mask).sum()) * voxel


#: Mirror views of test-time augmentation: axes flipped, on (z, y, x) arrays.
TTA_VIEWS: dict[str, tuple[int, ...]] = {"none": (), "x": (2,), "y": (1,), "xy": (1, 2)}


def _slices_as_channels(array: np.ndarray, k: int) -> np.ndarray:
    """(z, y, x) -> (z, k, y, x): each axial slice with its neighbours (edges repeated)."""
    half = k // 2
    idx = np.clip(
        np.arange(array.shape[0])[:, None] + np.arange(-half, half + 1), 0, array.shape[0] - 1
    )
    out: np.ndarray = array[idx]
    return out


def whole_roi(shape: tuple[int, ...], multiple: int, cap: int) -> tuple[int, ...]:
    """A window covering ``shape`` (rounded up to ``multiple``, at most ``cap`` per axis)."""
    return tuple(min(cap, -(-int(n) // multiple) * multiple) for n in shape)


def predict(
    net: torch.nn.Module,
    array: np.ndarray,
    arch: dict[str, Any],
    device: torch.device,
    *,
    inference: str | None = None,
) -> np.ndarray:
    """Sigmoid probabilities over a (z, y, x) array.

    3D networks see ``patch``-sized (x, y, z) windows, or a 2.5D network 2D
    windows over every axial slice with its neighbours as channels.
    ``inference`` (default: the arch's ``inference``, else ``window``):
    ``window`` slides the training patch with 25 % Gaussian-weighted overlap;
    ``whole`` gives the network the whole array at once (padded to what its
    strides need): the same fully convolutional network, 3-10x faster on a
    CPU, scored on the same folds before a card adopts it. Autocast (AMP) on CUDA.
    """
    patch = arch["patch"]
    k = network.context(arch)
    whole = (inference or arch.get("inference") or "window") == "whole"
    multiple = int(np.prod(arch["strides"]))
    data = np.ascontiguousarray(array, dtype=np.float32)
    roi: tuple[int, ...]
    if k:  # slices are the batch, neighbours the channels: (z, k, y, x)
        x = torch.from_numpy(np.ascontiguousarray(_slices_as_channels(data, k)))
        roi = whole_roi(array.shape[1:], multiple, 384) if whole else (patch[1], patch[0])
        batch = 4 if whole else 16
    else:  # one volume, one channel: (1, 1, z, y, x); torch's (D, H, W) is (z, y, x)
        x = torch.from_numpy(data)[None, None]
        roi = whole_roi(array.shape, multiple, 256) if whole else (patch[2], patch[1], patch[0])
        batch = 1 if whole else 4
    with (
        torch.inference_mode(),
        torch.autocast(device_type=device.type, enabled=device.type == "cuda"),
    ):
        logits = sliding_window_inference(
            x.to(device),
            tuple(int(n) for n in roi),
            sw_batch_size=batch,
            predictor=net,
            overlap=0.0 if whole else 0.25,
            mode="gaussian",
        )
    assert isinstance(logits, torch.Tensor)
    prob = torch.sigmoid(logits.float())[:, 0].cpu().numpy()
    out: np.ndarray = prob if k else prob[0]
    return out


def predict_views(
    net: torch.nn.Module,
    array: np.ndarray,
    arch: dict[str, Any],
    device: torch.device,
    views: list[str],
    *,
    inference: str | None = None,
) -> list[np.ndarray]:
    """Probabilities of each mirror view (``TTA_VIEWS`` names), flipped back onto ``array``."""
    out = []
    for view in views:
        axes = TTA_VIEWS[view]
        flipped = np.flip(array, axes) if axes else array
        prob = predict(net, np.ascontiguousarray(flipped), arch, device, inference=inference)
        out.append(np.flip(prob, axes) if axes else prob)
    return out


def ensemble_probability(
    nets: list[torch.nn.Module],
    array: np.ndarray,
    arch: dict[str, Any],
    device: torch.device,
    views: list[str],
) -> tuple[np.ndarray, float | None]:
    """Mean probability of ``nets`` and the quality estimate (None with a single view).

    The first net runs every test-time view and its views' agreement is the
    quality estimate: the figure the cross-validation measures out-of-fold
    (there with one net), so the card's threshold applies. The other nets run
    the plain view. The probability is the mean over nets of each net's mean
    over its views.
    """
    per_net: list[np.ndarray] = []
    agreed: float | None = None
    for i, net in enumerate(nets):
        probs = predict_views(net, array, arch, device, views if i == 0 else ["none"])
        if len(probs) > 1:
            agreed = agreement(probs)
        per_net.append(np.mean(probs, axis=0))
    mean: np.ndarray = np.mean(per_net, axis=0)
    return mean, agreed


def load_weights(net: torch.nn.Module, path: Path) -> torch.nn.Module:
    """Load a state dict (stored in half precision to keep models small) as float32."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    return net


def to_mask(
    fine_prob: np.ndarray,
    fine_img: sitk.Image,
    image: sitk.Image,
    *,
    keep_fraction: float,
    threshold: float = 0.5,
) -> tuple[sitk.Image, sitk.Image]:
    """Fine-grid probabilities back on ``image``'s grid (linear), cut and post-processed.

    Returns (probability, mask) on ``image``'s grid.
    """
    prob = sitk.GetImageFromArray(fine_prob.astype(np.float32))
    prob.CopyInformation(fine_img)
    prob = sitk.Resample(prob, image, sitk.Transform(), sitk.sitkLinear, 0.0)
    mask = postprocess(sitk.Cast(prob >= threshold, sitk.sitkUInt8), keep_fraction=keep_fraction)
    return prob, mask


def members(card: dict[str, Any]) -> list[str]:
    """Weight entries of the fine ensemble: the card's ``ensemble.members``, else ``fine``."""
    listed = (card.get("ensemble") or {}).get("members")
    return [str(m) for m in listed] if listed else ["fine"]


def sequence_path(card: dict[str, Any], sequence: str | None) -> tuple[list[str], list[str]]:
    """(members, test-time views) that segment ``sequence``.

    A card may give a sequence its own fine path (``ensemble.by_sequence``):
    sarcnode-seg-demo 2.x keeps the 1.0.0 fine model on FS-T2, for which no
    real training or validation data exists beyond the end-to-end case (see
    its card). Any other sequence, or none named, gets the default ensemble.
    """
    ensemble = card.get("ensemble") or {}
    own = (ensemble.get("by_sequence") or {}).get(sequence) if sequence else None
    if own:
        return [str(m) for m in own["members"]], list(own.get("tta") or ["none"])
    return members(card), list(ensemble.get("tta") or ["none"])


def all_members(card: dict[str, Any]) -> list[str]:
    """Every fine weight entry a card names: the default ensemble, then each sequence's own."""
    names = members(card)
    for own in ((card.get("ensemble") or {}).get("by_sequence") or {}).values():
        names += [str(m) for m in own["members"] if str(m) not in names]
    return names


class Segmenter:
    """A loaded model: :meth:`segment` turns an image into a tumour mask with a quality estimate."""

    def __init__(self, model_dir: Path, device: str = "auto") -> None:
        """Load the card, the locator and every ensemble member; refuse mismatched checksums."""
        self.model_dir = model_dir
        self.card: dict[str, Any] = load_card(model_dir)
        check_inference_card(self.card, model_dir / CARD_FILE)
        self.device = pick_device(device)
        self.nets: dict[str, torch.nn.Module] = {}
        try:
            for name in ["coarse", *all_members(self.card)]:
                arch = self.card["architecture"]["coarse" if name == "coarse" else "fine"]
                path = model_dir / self.card["weights"][name]["file"]
                self.nets[name] = load_weights(network.build(arch), path).to(self.device).eval()
        except KeyError as exc:
            raise ModelError(f"model {model_dir}: card.yaml lacks {exc}") from exc
        by_sequence = (self.card.get("ensemble") or {}).get("by_sequence") or {}
        for sequence in [None, *by_sequence]:
            unknown = [v for v in sequence_path(self.card, sequence)[1] if v not in TTA_VIEWS]
            if unknown:
                raise ModelError(f"model {model_dir}: unknown test-time views {unknown}")
        self.post: dict[str, Any] = dict(self.card.get("postprocess") or {"keep_fraction": 0.1})

    @property
    def model_id(self) -> str:
        """``id`` and ``version`` from the card, e.g. ``sarcnode-seg 1.0.0``."""
        return f"{self.card.get('id')} {self.card.get('version')}"

    def fine_probability(
        self, array: np.ndarray, sequence: str | None = None
    ) -> tuple[np.ndarray, float | None]:
        """Probability and quality estimate of ``sequence``'s path: :func:`ensemble_probability`."""
        names, views = sequence_path(self.card, sequence)
        nets = [self.nets[name] for name in names]
        return ensemble_probability(
            nets, array, self.card["architecture"]["fine"], self.device, views
        )

    def locate(
        self, image: sitk.Image, seconds: dict[str, float] | None = None
    ) -> tuple[sitk.Image, tuple[tuple[int, int, int], tuple[int, int, int]], bool]:
        """The fine stage's input: the box around the tumour the coarse pass finds, resampled.

        Returns the box resampled to the fine spacing (not yet normalised), the
        box (start, size) on ``image``'s grid and whether the locator found a
        tumour (else the box is the whole image). ``seconds`` gets the
        ``preprocess`` time and the coarse pass's part of ``inference``.
        """
        seconds = {} if seconds is None else seconds
        t0 = time.perf_counter()
        arch_c, arch_f = self.card["architecture"]["coarse"], self.card["architecture"]["fine"]
        coarse_img = to_spacing(image, arch_c["spacing_mm"])
        coarse_arr = normalise(sitk.GetArrayFromImage(coarse_img))
        seconds["preprocess"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        coarse_prob = predict(self.nets["coarse"], coarse_arr, arch_c, self.device)
        coarse_mask = sitk.GetImageFromArray((coarse_prob >= 0.5).astype(np.uint8))
        coarse_mask.CopyInformation(coarse_img)
        if np.any(coarse_prob >= 0.5):
            coarse_mask = postprocess(coarse_mask, keep_fraction=0.2)
        box = box_around(coarse_mask, image, float(arch_f["margin_mm"]))
        located = box is not None
        if box is None:  # nothing found at 5 mm: let the fine model look everywhere
            box = ((0, 0, 0), image.GetSize())
        fine_img = to_spacing(crop(image, box), arch_f["spacing_mm"])
        seconds["inference"] = time.perf_counter() - t1
        return fine_img, box, located

    def segment(self, image: sitk.Image, sequence: str | None = None) -> Result:
        """Tumour mask (uint8 0/1) on ``image``'s grid, with per-step seconds and quality.

        ``sequence`` (``T2FS``, ``T1``) picks the card's fine path for that
        sequence (:func:`sequence_path`); ``None`` gets the default ensemble.

        Raises :class:`~.quality.InputRejected` when the image fails the input
        checks (constant, or noise rather than anatomy).
        """
        seconds: dict[str, float] = {}
        t0 = time.perf_counter()
        image = sitk.Cast(image, sitk.sitkFloat32)
        check_input(image, self.card.get("input_checks") or {})
        checked = time.perf_counter() - t0
        fine_img, box, located = self.locate(image, seconds)
        seconds["preprocess"] += checked
        t1 = time.perf_counter()
        fine_prob, agreed = self.fine_probability(
            normalise(sitk.GetArrayFromImage(fine_img)), sequence
        )
        seconds["inference"] += time.perf_counter() - t1

        t2 = time.perf_counter()
        prob, mask = to_mask(
            fine_prob, fine_img, image, keep_fraction=float(self.post.get("keep_fraction", 0.1))
        )
        seconds["postprocess"] = time.perf_counter() - t2
        quality = Quality.judge(agreed, self.card.get("quality") or {}, located=located)
        return Result(
            mask=mask,
            probability=prob,
            seconds=seconds,
            box=box,
            located=located,
            quality=quality,
            members=tuple(sequence_path(self.card, sequence)[0]),
        )
