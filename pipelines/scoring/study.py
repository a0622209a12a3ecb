"""One study scored by several cards: their extractions, then each card's result or skip record.

Used by ``sarcnode analyze`` in one process and by the node's radiomics and
score stages (checkpointed apart). A card that does not apply to the study,
whose features could not be extracted, or that refuses the study
(:class:`~pipelines.signature.card.ScoreError`) becomes a skip record with
the reason: the other cards still score, and nothing fails.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any

import pandas as pd
import SimpleITK as sitk

from pipelines.scoring import ScoreError, score
from pipelines.scoring.cards import Extraction, SignatureCard, card_facts

NOT_EXTRACTED = (
    "no features were extracted for it (no radiomics stage ran, or it ran before the card "
    "was added: run the job again)"
)


def extract_all(
    extractions: Sequence[Extraction],
    images: Mapping[str, sitk.Image],
    masks: Mapping[str, sitk.Image],
    *,
    study: str,
    workers: int | None = 1,
    pool: ProcessPoolExecutor | None = None,
    prepared: Mapping[str, Future[tuple[sitk.Image, sitk.Image]]] | None = None,
) -> tuple[dict[str, pd.DataFrame], dict[str, str]]:
    """(extraction key -> tidy table, card id -> why its extraction failed).

    The extractions share their common work (:func:`pipelines.radiomics.study.study_tables`);
    ``pool`` (a warm :func:`pipelines.radiomics.extract.worker_pool`) runs it;
    ``prepared`` is sequences' preparation already submitted to it.
    """
    from pipelines.radiomics.study import Request, study_tables

    requests = [Request(e.key, e.sequences, e.regions, e.params) for e in extractions]
    tables, errors = study_tables(
        requests, images, masks, study=study, workers=workers, pool=pool, prepared=prepared
    )
    failed: dict[str, str] = {}
    for extraction in extractions:
        if extraction.key in errors:
            reason = f"features could not be extracted: {errors[extraction.key]}"
            failed |= dict.fromkeys(extraction.cards, reason)
    return tables, failed


def score_all(
    signatures: Sequence[SignatureCard],
    rows: Mapping[str, Mapping[str, float]],
    skipped: Mapping[str, str],
    clinical: Mapping[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Each card's result, in order; ``rows`` maps card id -> its wide feature row."""
    results: list[dict[str, Any]] = []
    for s in signatures:
        if s.id in skipped or s.id not in rows:
            results.append(card_facts(s.card) | {"skipped": skipped.get(s.id, NOT_EXTRACTED)})
            continue
        try:
            results.append(score(s.card, rows[s.id], clinical, params_sha256=s.params_sha256))
        except ScoreError as exc:
            results.append(card_facts(s.card) | {"skipped": f"cannot be scored: {exc}"})
    return results


def first_scored(results: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """The first card that scored: what readers of the one-card outputs (``score``) get."""
    return next((dict(r) for r in results if "skipped" not in r), None)
