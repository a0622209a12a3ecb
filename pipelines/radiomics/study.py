"""One study's radiomics: regions on each sequence, features, and the wide row a card reads.

For each sequence with a tumour mask: the tumour, the 10 mm ring, and three
habitats. The body outline comes from T1 (air and tissue well apart) and is
carried to the other sequence (same frame of reference). Habitats need both
sequences' intensities on one grid: the other
sequence is registered (:func:`~pipelines.preprocess.register_rigid`) and
resampled onto this one, both are N4-corrected and histogram-standardised
inside the body, and K-means runs on the pairs inside the tumour (seed 003).
Images are N4-corrected and cropped 40 mm around the tumour before
extraction; PyRadiomics then normalises the crop (``normalize: true``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import SimpleITK as sitk

from pipelines.preprocess import body_mask, histogram_standardise, n4, register_rigid
from pipelines.radiomics.extract import KEYS, extract, run_units, table, units
from pipelines.radiomics.regions import habitat_counts, habitats, ring
from pipelines.segment.prep import box_around, crop

REGIONS = ("tumour", "ring", "habitat1", "habitat2", "habitat3")
#: Regions that may be too small to describe: a row with a note instead of a failure.
HABITATS = frozenset(r for r in REGIONS if r.startswith("habitat"))


CROP_MM = 40.0  # around the tumour: the ring (10 mm) and PyRadiomics' padding fit inside


@dataclass(frozen=True)
class StudyPrep:
    """What does not depend on the tumour masks: reused when masks vary (ICC perturbations)."""

    outline_body: sitk.Image
    corrected: dict[str, sitk.Image]
    transforms: dict[tuple[str, str], sitk.Transform]


def prepare_role(image: sitk.Image) -> tuple[sitk.Image, sitk.Image]:
    """(body mask, N4-corrected image) of one sequence: the costly, mask-independent part."""
    body = body_mask(image)
    return body, n4(sitk.Cast(image, sitk.sitkFloat32), body)


def prepare_study(
    images: Mapping[str, sitk.Image],
    *,
    habitats: bool = True,
    roles: Mapping[str, tuple[sitk.Image, sitk.Image]] | None = None,
) -> StudyPrep:
    """Body outline (from T1), N4-corrected images and, for habitats, one registration.

    ``roles`` holds :func:`prepare_role`'s result for each of ``images``
    when it was computed already (in a worker pool, or for another extraction).
    """
    outline = "T1" if "T1" in images else next(iter(images))
    done = roles or {role: prepare_role(image) for role, image in images.items()}
    bodies = {role: done[role][0] for role in images}
    corrected = {role: done[role][1] for role in images}
    transforms: dict[tuple[str, str], sitk.Transform] = {}
    order = list(images)
    if len(order) == 2 and habitats:  # one registration; its inverse serves the other direction
        fixed, moving = order
        result = register_rigid(corrected[fixed], corrected[moving])
        transforms[(fixed, moving)] = result.transform
        transforms[(moving, fixed)] = result.transform.GetInverse()
    return StudyPrep(bodies[outline], corrected, transforms)


def study_regions(
    images: Mapping[str, sitk.Image],
    tumours: Mapping[str, sitk.Image],
    *,
    seed: int = 0,
    wanted: tuple[str, ...] = REGIONS,
    prep: StudyPrep | None = None,
) -> tuple[dict[str, sitk.Image], dict[str, dict[str, sitk.Image]], dict[str, dict[str, float]]]:
    """(role -> prepared image, role -> region -> mask, role -> habitat counts).

    Each role with a tumour mask gets its N4-corrected image cropped
    ``CROP_MM`` around the tumour (PyRadiomics then normalises tissue, not a
    field of view that is mostly air, and works on a small image), and the
    regions on that crop. Only the ``wanted`` regions are made (without
    habitats there is no registration and no K-means). ``prep`` (from
    :func:`prepare_study` on the same images) skips the mask-independent work.
    """
    want_habitats = any(r.startswith("habitat") for r in wanted)
    prep = prep or prepare_study(images, habitats=want_habitats)
    outline_body, corrected, transforms = prep.outline_body, prep.corrected, prep.transforms
    roles = list(images)
    prepared: dict[str, sitk.Image] = {}
    regions: dict[str, dict[str, sitk.Image]] = {}
    counts: dict[str, dict[str, float]] = {}
    for role, tumour in tumours.items():
        image = corrected[role]
        tumour = sitk.Cast(tumour > 0, sitk.sitkUInt8)
        tumour.CopyInformation(image)
        box = box_around(tumour, image, CROP_MM)
        if box is None:
            raise ValueError(f"{role}: empty tumour mask")
        image, tumour = crop(image, box), crop(tumour, box)
        body = sitk.Resample(outline_body, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
        named = {"tumour": tumour}
        if "ring" in wanted:
            named["ring"] = ring(tumour, image, body=body)
        if want_habitats:
            channels = [histogram_standardise(image, body)]
            for other in roles:
                if other != role and (role, other) in transforms:
                    moved = sitk.Resample(
                        corrected[other], image, transforms[(role, other)], sitk.sitkLinear, 0.0
                    )
                    channels.append(histogram_standardise(moved, body))
            labels = habitats(channels, tumour, seed=seed)
            for h in (1, 2, 3):
                named[f"habitat{h}"] = sitk.Cast(labels == h, sitk.sitkUInt8)
            counts[role] = habitat_counts(labels)
        prepared[role] = image
        regions[role] = {name: mask for name, mask in named.items() if name in wanted}
    return prepared, regions, counts


def study_features(
    images: Mapping[str, sitk.Image],
    tumours: Mapping[str, sitk.Image],
    params: Mapping[str, Any] | None = None,
    *,
    study: str = "",
    workers: int | None = None,
    seed: int = 0,
    regions_wanted: tuple[str, ...] = REGIONS,
    pool: ProcessPoolExecutor | None = None,
    prep: StudyPrep | None = None,
) -> pd.DataFrame:
    """The tidy table (one row per sequence and region) for one study, habitat counts included."""
    prepared, regions, counts = study_regions(
        images, tumours, seed=seed, wanted=regions_wanted, prep=prep
    )
    frame = extract(
        prepared, regions, params, study=study, workers=workers, optional=HABITATS, pool=pool
    )
    return _add_counts(frame, counts)


def _add_counts(table: pd.DataFrame, counts: Mapping[str, Mapping[str, float]]) -> pd.DataFrame:
    """The habitat counts as columns of each sequence's tumour row."""
    for role, values in counts.items():
        for key, value in values.items():
            table.loc[
                (table["sequence"] == role) & (table["region"] == "tumour"), f"habitat_{key}"
            ] = value
    return table


@dataclass(frozen=True)
class Request:
    """One extraction asked of a study: its sequences, regions and PyRadiomics parameters."""

    key: str
    sequences: tuple[str, ...]
    regions: tuple[str, ...]
    params: Mapping[str, Any]


Prepared = tuple[sitk.Image, sitk.Image]  # (body mask, N4-corrected image): prepare_role's


def prepare_roles(
    images: Mapping[str, sitk.Image],
    pool: ProcessPoolExecutor | None = None,
    ahead: Mapping[str, Future[Prepared]] | None = None,
) -> tuple[dict[str, Prepared], dict[str, str]]:
    """(role -> :func:`prepare_role`'s result, role -> why it failed), in ``pool`` when given.

    ``ahead`` holds roles whose preparation was submitted before (while the
    tumour was being segmented): their results are taken from there.
    """
    done: dict[str, Prepared] = {}
    failed: dict[str, str] = {}
    ahead = ahead or {}
    futures = {
        role: ahead[role] if role in ahead else _submit(pool, image)
        for role, image in images.items()
    }
    for role, future in futures.items():
        try:
            done[role] = future.result()
        except ValueError as exc:  # this study's image, not the node
            failed[role] = str(exc)
    return done, failed


def _submit(pool: ProcessPoolExecutor | None, image: sitk.Image) -> Future[Prepared]:
    """:func:`prepare_role` in ``pool``, or done here (as a finished future) without one."""
    if pool is not None:
        return pool.submit(prepare_role, image)
    future: Future[Prepared] = Future()
    try:
        future.set_result(prepare_role(image))
    except ValueError as exc:
        future.set_exception(exc)
    return future


Regions = tuple[
    dict[str, sitk.Image], dict[str, dict[str, sitk.Image]], dict[str, dict[str, float]]
]  # what study_regions gives: crops, region masks, habitat counts


def _request_regions(
    q: Request,
    images: Mapping[str, sitk.Image],
    tumours: Mapping[str, sitk.Image],
    ready: Mapping[str, Prepared],
    made: dict[tuple[str, ...], Regions],
    seed: int,
) -> Regions:
    """:func:`study_regions` for one request, a sequence's regions reused from ``made``.

    Without habitats a sequence's crop and regions depend only on its own
    image and tumour and on the body outline's sequence, so a second request
    with the same sequence, outline and regions takes them from ``made``.
    """
    subset = {r: images[r] for r in q.sequences}
    want_habitats = any(r.startswith("habitat") for r in q.regions)
    prep = prepare_study(subset, habitats=want_habitats, roles=ready)
    if want_habitats:  # the other sequence's image takes part: made for this request
        return study_regions(
            subset, {r: tumours[r] for r in q.sequences}, seed=seed, wanted=q.regions, prep=prep
        )
    outline = "T1" if "T1" in subset else next(iter(subset))
    crops: dict[str, sitk.Image] = {}
    regions: dict[str, dict[str, sitk.Image]] = {}
    for role in q.sequences:
        key = (role, outline, *q.regions)
        if key not in made:
            made[key] = study_regions(
                subset, {role: tumours[role]}, seed=seed, wanted=q.regions, prep=prep
            )
        crops |= made[key][0]
        regions |= made[key][1]
    return crops, regions, {}


def study_tables(
    requests: Sequence[Request],
    images: Mapping[str, sitk.Image],
    tumours: Mapping[str, sitk.Image],
    *,
    study: str = "",
    seed: int = 0,
    workers: int | None = 1,
    pool: ProcessPoolExecutor | None = None,
    prepared: Mapping[str, Future[Prepared]] | None = None,
) -> tuple[dict[str, pd.DataFrame], dict[str, str]]:
    """(request key -> tidy table, request key -> why it failed) for several extractions at once.

    Each table equals :func:`study_features` on the request's sequences (the
    same steps on the same inputs), but the work they share is done once:
    each sequence's body outline and N4 correction, and every PyRadiomics
    unit whose voxels and parameters two requests have in common. With
    ``pool`` the sequences are prepared side by side and the units spread
    over its workers; ``prepared`` is preparation submitted before
    (:func:`prepare_roles`).
    """
    roles = [r for r in images if any(r in q.sequences for q in requests)]
    ready, broken = prepare_roles({r: images[r] for r in roles}, pool, prepared)
    failed: dict[str, str] = {}
    planned = []
    made: dict[tuple[str, ...], Regions] = {}
    for q in requests:
        bad = [r for r in q.sequences if r in broken]
        try:
            if bad:
                raise ValueError(broken[bad[0]])
            crops, regions, counts = _request_regions(q, images, tumours, ready, made, seed)
            work = units(regions, crops, q.params, optional=HABITATS)
        except ValueError as exc:  # ExtractionError, an empty mask: this study, not the node
            failed[q.key] = str(exc)
            continue
        planned.append((q, work, counts))
    every = [u for _, work, _ in planned for _, _, u in work]
    results = run_units(every, workers=workers, pool=pool)
    tables: dict[str, pd.DataFrame] = {}
    for q, work, counts in planned:
        mine, results = results[: len(work)], results[len(work) :]
        try:
            tables[q.key] = _add_counts(table(work, mine, study=study, optional=HABITATS), counts)
        except ValueError as exc:
            failed[q.key] = str(exc)
    return tables, failed


def wide(table: pd.DataFrame) -> pd.DataFrame:
    """One row per study, columns ``<sequence>:<region>:<feature>`` (what cards name)."""
    rows: dict[str, dict[str, float]] = {}
    for _, row in table.iterrows():
        prefix = f"{row['sequence']}:{row['region']}:"
        out = rows.setdefault(str(row["study"]), {})
        for column, value in row.items():
            if column not in KEYS and column != "note" and pd.notna(value):
                out[prefix + str(column)] = float(value)
    frame = pd.DataFrame.from_dict(rows, orient="index")
    frame.index.name = "id"
    return frame.reindex(sorted(frame.columns), axis=1).astype(np.float64)
