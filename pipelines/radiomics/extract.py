"""Radiomics features with PyRadiomics, per (sequence, region), in parallel.

Each (sequence, region) is one ordinary PyRadiomics ``execute`` with the
whole parameter file, and the units run in worker processes, so every value
is exactly what a plain sequential PyRadiomics call gives
(``tests/pipelines/test_radiomics.py`` checks equality). Finer units (one
per image type) were tried and were slower: each repeats PyRadiomics'
normalisation and resampling, which on a tumour crop costs as much as the
features; and no work can be shared between regions without changing
values, since PyRadiomics resamples each region onto its own bounding-box
grid. Inside each unit, PyRadiomics' slowest numpy steps run compiled
(:mod:`pipelines.radiomics.fast`, same operations in the same order), and
BLAS is held to one thread per worker.

A parameter file may carry a ``sarcnode`` section that is not PyRadiomics'
and is left out of every PyRadiomics call: ``sarcnode: {mode: ibsi}`` turns
PyRadiomics' values into the IBSI 1 definitions (:mod:`pipelines.radiomics.ibsi`);
the default mode, ``pyradiomics``, keeps them as PyRadiomics computes them.
The mode is part of :func:`params_hash`, so a card fitted in one mode refuses
features extracted in the other; a file without the section hashes as before.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import multiprocessing
import os
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import pandas as pd
import SimpleITK as sitk
import yaml

from pipelines.owner import watch_owner
from pipelines.radiomics import ibsi
from pipelines.share import config_dir

DEFAULT_PARAMS = config_dir() / "radiomics" / "mr-default.yaml"
KEYS = ("study", "sequence", "region")  # then "note" (why a region has no features), features
SECTION = "sarcnode"  # the parameter file's own section, never passed to PyRadiomics
MODES = ("pyradiomics", "ibsi")
DEFAULT_MODE = "pyradiomics"


class ExtractionError(ValueError):
    """A region cannot be described (empty or too small mask, bad parameters)."""


def load_params(path: Path = DEFAULT_PARAMS) -> dict[str, Any]:
    """A PyRadiomics parameter file as a dict (validated by PyRadiomics on first use)."""
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ExtractionError(f"radiomics parameters {path}: {exc}") from exc
    if not isinstance(data, dict) or "imageType" not in data:
        raise ExtractionError(f"radiomics parameters {path}: needs an 'imageType' section")
    ok, reason = check_section(data.get(SECTION, {}))
    if not ok:
        raise ExtractionError(f"radiomics parameters {path}: '{SECTION}' {reason}")
    return data


def check_section(section: object) -> tuple[bool, str]:
    """Whether a ``sarcnode`` section is valid, and why not."""
    if not isinstance(section, dict):
        return False, "must be a mapping"
    unknown = sorted(set(section) - {"mode"})
    if unknown:
        return False, f"has unknown keys {unknown} (only 'mode')"
    mode = section.get("mode", DEFAULT_MODE)
    if mode not in MODES:
        return False, f"mode {mode!r} is not one of {', '.join(MODES)}"
    return True, ""


def extraction_mode(params: Mapping[str, Any]) -> str:
    """The parameters' extraction mode, ``pyradiomics`` (default) or ``ibsi``: what a card records.

    Raises
    ------
    ExtractionError
        When the ``sarcnode`` section is invalid.
    """
    section = params.get(SECTION, {})
    ok, reason = check_section(section)
    if not ok:
        raise ExtractionError(f"radiomics parameters: '{SECTION}' {reason}")
    return str(section.get("mode", DEFAULT_MODE))


def card_mode(card: Mapping[str, Any]) -> str:
    """The extraction mode a signature card was fitted with (cards without one: ``pyradiomics``)."""
    extraction = card.get("extraction") or {}
    return str(extraction.get("mode", DEFAULT_MODE))


def pyradiomics_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """The parameters PyRadiomics is given: a deep copy without the ``sarcnode`` section."""
    return copy.deepcopy({k: v for k, v in params.items() if k != SECTION})


def params_hash(params: Mapping[str, Any]) -> str:
    """SHA-256 of the parameters' canonical JSON: what a signature card pins.

    The ``sarcnode`` section counts only when it names a mode other than the
    default, so files without it (every card fitted before IBSI mode) keep
    their hash, and ``mode: pyradiomics`` written out hashes like no section.
    """
    canonical = pyradiomics_params(params)
    mode = extraction_mode(params)
    if mode != DEFAULT_MODE:
        canonical[SECTION] = {"mode": mode}
    return hashlib.sha256(json.dumps(canonical, sort_keys=True).encode()).hexdigest()


def _execute(image: sitk.Image, mask: sitk.Image, settings: dict[str, Any]) -> dict[str, Any]:
    """PyRadiomics' whole result, diagnostics included when ``additionalInfo`` is on."""
    from radiomics import featureextractor

    logging.getLogger("radiomics").setLevel(logging.ERROR)
    extractor = featureextractor.RadiomicsFeatureExtractor(settings)
    try:
        return dict(extractor.execute(image, mask))
    except (ValueError, RuntimeError) as exc:
        raise ExtractionError(str(exc)) from exc


def _numbers(result: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in result.items() if not k.startswith("diagnostics_")}


def plain_pyradiomics(
    image: sitk.Image, mask: sitk.Image, params: Mapping[str, Any]
) -> dict[str, float]:
    """One ordinary PyRadiomics call with the whole parameter set (the reference).

    The ``sarcnode`` section is left out and the mode ignored: these are
    PyRadiomics' own values.
    """
    return _numbers(_execute(image, mask, pyradiomics_params(params)))


def _fast_pyradiomics(
    image: sitk.Image, mask: sitk.Image, params: Mapping[str, Any]
) -> dict[str, float]:
    """The same call with the compiled GLCM steps, without the diagnostics, in the params' mode.

    ``additionalInfo: false`` only drops the ``diagnostics_*`` entries (image
    and mask hashes, versions), which this table never keeps; the features
    are computed exactly as in :func:`plain_pyradiomics`. IBSI mode keeps
    them on for the shape mask's voxel count, then corrects the values
    (:func:`pipelines.radiomics.ibsi.to_ibsi`).
    """
    from threadpoolctl import threadpool_limits

    from pipelines.radiomics.fast import accelerated

    mode = extraction_mode(params)
    settings = pyradiomics_params(params)
    settings["setting"] = {**(settings.get("setting") or {}), "additionalInfo": mode == "ibsi"}
    # One BLAS thread: the worker processes already fill the CPUs, and OpenBLAS
    # threads spinning against each other made the pool slower than one process
    # (bench/radiomics.py: 0.64x). Only MCC's eigenvalues use BLAS; with one
    # thread a few of them can differ from a two-thread run in the last bit.
    with threadpool_limits(limits=1, user_api="blas"), accelerated():
        result = _execute(image, mask, settings)
    values = _numbers(result)
    if mode != "ibsi":
        return values
    try:
        voxels = (
            ibsi.shape_voxel_count(
                result, resegment_shape=bool(settings["setting"].get("resegmentShape"))
            )
            if ibsi.has_axis_lengths(values)
            else None
        )
        return ibsi.to_ibsi(values, shape_voxels=voxels, undo_shift=_shifted(settings))
    except ValueError as exc:
        raise ExtractionError(f"IBSI mode: {exc}") from exc


def _shifted(settings: Mapping[str, Any]) -> bool:
    """Whether any image type's first-order features add a ``voxelArrayShift``."""
    shifts = [(settings.get("setting") or {}).get("voxelArrayShift", 0)]
    custom = settings["imageType"].values()
    shifts += [(kwargs or {}).get("voxelArrayShift", 0) for kwargs in custom]
    return any(shift != 0 for shift in shifts)


def _warm_worker(owner: int | None = None, also: Callable[[], None] | None = None) -> None:
    """Pool initialiser: import PyRadiomics and load the compiled GLCM steps once per worker.

    ``also`` warms what else the pool's owner runs in it (the node's encoders).
    """
    import numpy as np

    from pipelines.radiomics import fast

    if owner is not None:
        watch_owner(owner, name="pool-owner-watchdog")
    logging.getLogger("radiomics").setLevel(logging.ERROR)
    import radiomics.featureextractor  # noqa: F401

    import pipelines.preprocess  # noqa: F401  (N4 and the body outline run here too)

    tiny = np.full((1, 2, 2, 1), 0.25)
    fast._q_matrix(tiny, tiny.sum(2, keepdims=True), tiny.sum(1, keepdims=True), 1e-16)
    fast._diagonal_sums(tiny, np.array([1, 2]), 2)
    if also is not None:
        also()


def worker_pool(
    workers: int | None = None, also: Callable[[], None] | None = None
) -> ProcessPoolExecutor:
    """A process pool for :func:`extract`, started once and reused across studies.

    Workers are forkserver children (no inherited threads or locks), already
    holding PyRadiomics and the compiled GLCM steps: a service or a cohort run
    keeps one pool instead of paying the start-up on every study. Each worker
    ends itself when the process that made the pool is gone. ``also`` (a
    module-level function) runs in each worker after that: what else its
    owner will run in the pool loaded ahead too.
    """
    n = workers or len(os.sched_getaffinity(0))
    context = multiprocessing.get_context("forkserver")
    return ProcessPoolExecutor(
        max_workers=n, mp_context=context, initializer=_warm_worker, initargs=(os.getpid(), also)
    )


Unit = tuple[sitk.Image, sitk.Image, dict[str, Any]]  # image, region mask, parameters


def _run_unit(args: Unit) -> dict[str, float] | str:
    """Features of one unit, or the error message (raised, or not, by the caller)."""
    image, mask, params = args
    try:
        return _fast_pyradiomics(image, mask, params)
    except ExtractionError as exc:
        return str(exc)


def units(
    regions: Mapping[str, Mapping[str, sitk.Image]],
    images: Mapping[str, sitk.Image],
    params: Mapping[str, Any],
    *,
    optional: frozenset[str] = frozenset(),
) -> list[tuple[str, str, Unit]]:
    """(sequence, region, unit) for every region: one PyRadiomics call each.

    Raises
    ------
    ExtractionError
        The parameters' ``sarcnode`` section is invalid, or a region not in
        ``optional`` is empty.
    """
    params = dict(params)
    extraction_mode(params)  # a bad mode fails the call, not each region
    out: list[tuple[str, str, Unit]] = []
    for sequence, named in regions.items():
        for region, mask in named.items():
            if not sitk.GetArrayViewFromImage(mask).any() and region not in optional:
                raise ExtractionError(f"{sequence}/{region}: empty mask")
            out.append((sequence, region, (images[sequence], mask, params)))
    return out


def _content_key(unit: Unit) -> str:
    """What a unit's result depends on: both images' voxels and geometry, and the parameters."""
    digest = hashlib.sha256()
    for image in unit[:2]:
        digest.update(repr((image.GetSize(), image.GetSpacing(), image.GetOrigin())).encode())
        digest.update(repr((image.GetDirection(), image.GetPixelIDValue())).encode())
        digest.update(sitk.GetArrayViewFromImage(image).tobytes())
    digest.update(json.dumps(unit[2], sort_keys=True, default=str).encode())
    return digest.hexdigest()


def run_units(
    work: Sequence[Unit], *, workers: int | None = 1, pool: ProcessPoolExecutor | None = None
) -> list[dict[str, float] | str]:
    """Each unit's features (or its error message), in order; equal units computed once.

    Two units with the same voxels, geometry and parameters (one study's
    regions serving two extractions) give the same values, so only one of
    them runs. ``pool`` (from :func:`worker_pool`) runs them, largest region
    first; without one, ``workers`` > 1 starts a pool for this call and 1
    runs them in this process.
    """
    keys = [_content_key(u) for u in work]
    first = {key: i for i, key in reversed(list(enumerate(keys)))}
    todo = sorted(first.values(), key=lambda i: -int(sitk.GetArrayViewFromImage(work[i][1]).sum()))
    n = min(workers or len(os.sched_getaffinity(0)), len(todo))
    # ITK keeps its default thread count in the workers: with one thread its
    # filters round differently and values would no longer equal PyRadiomics'
    # (bench/radiomics.py measured 3.2x that way, with 1122 values changed).
    if pool is not None:
        done = dict(zip(todo, pool.map(_run_unit, [work[i] for i in todo]), strict=True))
    elif n <= 1:
        done = {i: _run_unit(work[i]) for i in todo}
    else:
        with worker_pool(n) as own:
            done = dict(zip(todo, own.map(_run_unit, [work[i] for i in todo]), strict=True))
    return [done[first[key]] for key in keys]


def table(
    work: Sequence[tuple[str, str, Unit]],
    results: Sequence[dict[str, float] | str],
    *,
    study: str = "",
    optional: frozenset[str] = frozenset(),
) -> pd.DataFrame:
    """The tidy table of :func:`units`' results: one row per (sequence, region), columns sorted.

    Raises
    ------
    ExtractionError
        PyRadiomics refused a region not in ``optional`` (the others get
        their reason in the ``note`` column).
    """
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for (sequence, region, _), values in zip(work, results, strict=True):
        row = rows.setdefault(
            (sequence, region), {"study": study, "sequence": sequence, "region": region}
        )
        if isinstance(values, str):
            if region not in optional:
                raise ExtractionError(f"{sequence}/{region}: {values}")
            row["note"] = values
        else:
            row.update(values)
    frame = pd.DataFrame(list(rows.values()))
    frame["note"] = frame["note"].fillna("") if "note" in frame.columns else ""
    features = sorted(c for c in frame.columns if c not in (*KEYS, "note"))
    return frame[[*KEYS, "note", *features]]


def extract(
    images: Mapping[str, sitk.Image],
    regions: Mapping[str, Mapping[str, sitk.Image]],
    params: Mapping[str, Any] | None = None,
    *,
    study: str = "",
    workers: int | None = None,
    optional: frozenset[str] = frozenset(),
    pool: ProcessPoolExecutor | None = None,
) -> pd.DataFrame:
    """Features for every (sequence, region): one row each, feature columns sorted.

    ``images`` maps sequence -> image; ``regions`` maps sequence -> region
    name -> mask on that image's grid. ``workers`` defaults to the CPUs this
    process may use; 1 runs in-process; ``pool`` (from :func:`worker_pool`)
    is used instead of starting one for this call. A region named in ``optional`` that
    PyRadiomics refuses (a habitat too small to describe) gets a row without
    features and its reason in the ``note`` column instead of failing the study.
    """
    work = units(regions, images, params or load_params(), optional=optional)
    results = run_units([u for _, _, u in work], workers=workers, pool=pool)
    return table(work, results, study=study, optional=optional)
