"""RTSTRUCT contours to a voxel mask on a reference image (expert contours for scoring).

Each CLOSED_PLANAR contour's points (patient coordinates, mm) are mapped to
continuous voxel indices of the reference image, assigned to the nearest
slice, and filled as a polygon; contours on the same slice are combined by
XOR, so an inner contour cuts a hole as RT systems draw them. A voxel is in
the mask when its centre lies inside the polygon.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from PIL import Image, ImageDraw


class ContourError(ValueError):
    """The RTSTRUCT has no such ROI, or its contours do not fit the reference image."""


def roi_names(path: Path) -> list[str]:
    """Names of the ROIs in an RTSTRUCT file."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return [str(r.ROIName) for r in ds.get("StructureSetROISequence", [])]


def rtstruct_mask(path: Path, reference: sitk.Image, roi_name: str) -> sitk.Image:
    """Rasterise ROI ``roi_name`` of the RTSTRUCT at ``path`` onto ``reference``'s grid.

    Raises
    ------
    ContourError
        No ROI of that name, no contours, or every contour lies outside the image.
    """
    ds = pydicom.dcmread(path)
    numbers = {
        int(r.ROINumber) for r in ds.get("StructureSetROISequence", []) if r.ROIName == roi_name
    }
    if not numbers:
        raise ContourError(f"{path.name}: no ROI named {roi_name!r} (has {roi_names(path)})")
    size = reference.GetSize()  # (x, y, z)
    mask = np.zeros((size[2], size[1], size[0]), np.uint8)
    drawn = 0
    for roi in ds.get("ROIContourSequence", []):
        if int(roi.ReferencedROINumber) not in numbers:
            continue
        for contour in roi.get("ContourSequence", []):
            if contour.get("ContourGeometricType", "CLOSED_PLANAR") != "CLOSED_PLANAR":
                continue
            points = np.asarray(contour.ContourData, float).reshape(-1, 3)
            index = np.array(
                [reference.TransformPhysicalPointToContinuousIndex(tuple(p)) for p in points]
            )
            k = round(float(np.median(index[:, 2])))
            if not 0 <= k < size[2] or len(points) < 3:
                continue
            layer = Image.new("1", (size[0], size[1]), 0)
            # Pillow fills pixel centres at integer coordinates: index space matches.
            ImageDraw.Draw(layer).polygon([(float(x), float(y)) for x, y in index[:, :2]], fill=1)
            mask[k] ^= np.asarray(layer, np.uint8)
            drawn += 1
    if drawn == 0:
        raise ContourError(f"{path.name}: ROI {roi_name!r} has no contour inside the image")
    out = sitk.GetImageFromArray(mask)
    out.CopyInformation(reference)
    return out
