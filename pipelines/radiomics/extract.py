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
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import multiprocessing
import os
from collections.abc import Mapping
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import pandas as pd
import SimpleITK as sitk
import yaml

DEFAULT_PARAMS = Path(__file__).resolve().parents[2] / "config" / "radiomics" / "mr-default.yaml"
KEYS = ("study", "sequence", "region")  # then "note" (why a region has no features), features


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
    return data


def params_hash(params: Mapping[str, Any]) -> str:
    """SHA-256 of the parameters' canonical JSON: what a signature card pins."""
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()


def plain_pyradiomics(
    image: sitk.Image, mask: sitk.Image, params: Mapping[str, Any]
) -> dict[str, float]:
    """One ordinary PyRadiomics call with the whole parameter set (the reference)."""
    from radiomics import featureextractor

    logging.getLogger("radiomics").setLevel(logging.ERROR)
    extractor = featureextractor.RadiomicsFeatureExtractor(copy.deepcopy(dict(params)))
    try:
        result = extractor.execute(image, mask)
    except (ValueError, RuntimeError) as exc:
        raise ExtractionError(str(exc)) from exc
    return {k: float(v) for k, v in result.items() if not k.startswith("diagnostics_")}


def _fast_pyradiomics(
    image: sitk.Image, mask: sitk.Image, params: Mapping[str, Any]
) -> dict[str, float]:
    """The same call with the compiled GLCM steps and without the diagnostics.

    ``additionalInfo: false`` only drops the ``diagnostics_*`` entries (image
    and mask hashes, versions), which this table never keeps; the features
    are computed exactly as in :func:`plain_pyradiomics`.
    """
    from threadpoolctl import threadpool_limits

    from pipelines.radiomics.fast import accelerated

    settings = copy.deepcopy(dict(params))
    settings["setting"] = {**(settings.get("setting") or {}), "additionalInfo": False}
    # One BLAS thread: the worker processes already fill the CPUs, and OpenBLAS
    # threads spinning against each other made the pool slower than one process
    # (bench/radiomics.py: 0.64x). Only MCC's eigenvalues use BLAS; with one
    # thread a few of them can differ from a two-thread run in the last bit.
    with threadpool_limits(limits=1, user_api="blas"), accelerated():
        return plain_pyradiomics(image, mask, settings)


def _warm_worker() -> None:
    """Pool initialiser: import PyRadiomics and load the compiled GLCM steps once per worker."""
    import numpy as np

    from pipelines.radiomics import fast

    logging.getLogger("radiomics").setLevel(logging.ERROR)
    import radiomics.featureextractor  # noqa: F401

    tiny = np.full((1, 2, 2, 1), 0.25)
    fast._q_matrix(tiny, tiny.sum(2, keepdims=True), tiny.sum(1, keepdims=True), 1e-16)
    fast._diagonal_sums(tiny, np.array([1, 2]), 2)


def worker_pool(workers: int | None = None) -> ProcessPoolExecutor:
    """A process pool for :func:`extract`, started once and reused across studies.

    Workers are forkserver children (no inherited threads or locks), already
    holding PyRadiomics and the compiled GLCM steps: a service or a cohort run
    keeps one pool instead of paying the start-up on every study.
    """
    n = workers or len(os.sched_getaffinity(0))
    context = multiprocessing.get_context("forkserver")
    return ProcessPoolExecutor(max_workers=n, mp_context=context, initializer=_warm_worker)


def _run_unit(args: tuple[sitk.Image, sitk.Image, dict[str, Any]]) -> dict[str, float] | str:
    """Features of one unit, or the error message (raised, or not, by the caller)."""
    image, mask, params = args
    try:
        return _fast_pyradiomics(image, mask, params)
    except ExtractionError as exc:
        return str(exc)


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
    params = dict(params or load_params())
    jobs: list[tuple[str, str, tuple[sitk.Image, sitk.Image, dict[str, Any]]]] = []
    for sequence, named in regions.items():
        for region, mask in named.items():
            if not sitk.GetArrayViewFromImage(mask).any() and region not in optional:
                raise ExtractionError(f"{sequence}/{region}: empty mask")
            jobs.append((sequence, region, (images[sequence], mask, params)))
    # Largest regions first, so no worker is left with a big one at the end.
    order = sorted(
        range(len(jobs)),
        key=lambda i: -int(sitk.GetArrayViewFromImage(jobs[i][2][1]).sum()),
    )
    n = workers or len(os.sched_getaffinity(0))
    results: list[dict[str, float] | str] = [""] * len(jobs)
    # ITK keeps its default thread count in the workers: with one thread its
    # filters round differently and values would no longer equal PyRadiomics'
    # (bench/radiomics.py measured 3.2x that way, with 1122 values changed).
    if pool is not None:
        for i, value in zip(order, pool.map(_run_unit, [jobs[i][2] for i in order]), strict=True):
            results[i] = value
    elif n <= 1:
        for i in order:
            results[i] = _run_unit(jobs[i][2])
    else:
        with worker_pool(min(n, len(jobs))) as own:
            for i, value in zip(
                order, own.map(_run_unit, [jobs[i][2] for i in order]), strict=True
            ):
                results[i] = value
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for (sequence, region, _), values in zip(jobs, results, strict=True):
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
