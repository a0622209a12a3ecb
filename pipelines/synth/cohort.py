"""A synthetic cohort: studies, clinical variables and progression-free survival.

Survival is drawn from a documented proportional-hazards model over the
latent tumour traits that also shape the images, so a correct radiomics
pipeline can recover a real signal. The true linear predictor (the oracle)
is written with the data.

Model (per case, traits from :func:`pipelines.synth.anatomy.draw_traits`)::

    LP = 0.9 * ln(volume_ml / 30)
       + 1.0 * (heterogeneity - 0.5)
       + 1.5 * (necrosis - 0.2)
       + 0.05 * (edema_mm - 8)
       + 1.0 * (irregularity - 0.4)
       + 0.8 * metastasis + 0.4 * [grade == 3]
    S(t | LP) = exp(-(t / 1500 d) ** 1.2 * exp(LP))          (Weibull baseline)
    censoring: uniform(200, 2400) d, administrative at 1800 d

Clinical variables: metastasis at diagnosis ~ Bernoulli(logit⁻¹(-2 + 1.2 ln(vol/30)
+ 1.5 irregularity)); grade 3 with probability rising with heterogeneity and
necrosis, else grade 1 or 2; peritumoral edema = edema_mm > 6; age ~ N(55, 15)
clipped to 18-90; sex 50/50; batch = the scanner manufacturer of the study.
"""

from __future__ import annotations

import csv
import json
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from pipelines.synth.anatomy import Traits, draw_traits
from pipelines.synth.study import NOT_CLINICAL, VENDORS, write_study

WEIBULL_SCALE_D = 1500.0
WEIBULL_SHAPE = 1.2
ADMIN_CENSOR_D = 1800.0
COEFFICIENTS = {
    "log_volume": 0.9,
    "heterogeneity": 1.0,
    "necrosis": 1.5,
    "edema_mm": 0.05,
    "irregularity": 1.0,
    "metastasis": 0.8,
    "grade3": 0.4,
}


@dataclass(frozen=True)
class Case:
    """One cohort row: identity, clinical variables, outcome and the oracle."""

    case_id: str
    seed: int
    age: int
    sex: str
    edema: int
    metastasis: int
    grade: int
    batch: str
    time_days: float
    event: int
    oracle_lp: float
    traits: Traits


def linear_predictor(traits: Traits, metastasis: int, grade: int) -> float:
    """The true log-hazard ratio of a case (see the module docstring)."""
    c = COEFFICIENTS
    return float(
        c["log_volume"] * np.log(traits.volume_ml / 30)
        + c["heterogeneity"] * (traits.heterogeneity - 0.5)
        + c["necrosis"] * (traits.necrosis - 0.2)
        + c["edema_mm"] * (traits.edema_mm - 8)
        + c["irregularity"] * (traits.irregularity - 0.4)
        + c["metastasis"] * metastasis
        + c["grade3"] * (grade == 3)
    )


def draw_case(seed: int) -> Case:
    """Traits, clinical variables and outcome of case ``seed`` (deterministic)."""
    traits = draw_traits(np.random.default_rng(seed))  # same traits write_study(seed) draws
    rng = np.random.default_rng([seed, 7])
    log_vol = np.log(traits.volume_ml / 30)
    p_met = 1 / (1 + np.exp(-(-2 + 1.2 * log_vol + 1.5 * traits.irregularity)))
    metastasis = int(rng.random() < p_met)
    p_g3 = 1 / (1 + np.exp(-(-1.5 + 2.0 * traits.heterogeneity + 3.0 * traits.necrosis)))
    grade = 3 if rng.random() < p_g3 else int(rng.integers(1, 3))
    lp = linear_predictor(traits, metastasis, grade)
    t_event = WEIBULL_SCALE_D * (-np.log(rng.random()) / np.exp(lp)) ** (1 / WEIBULL_SHAPE)
    t_censor = min(rng.uniform(200, 2400), ADMIN_CENSOR_D)
    vendor_rng = np.random.default_rng(seed)  # replays write_study's vendor draw
    draw_traits(vendor_rng)
    batch = VENDORS[int(vendor_rng.integers(len(VENDORS)))][0]
    return Case(
        case_id=f"SYN{seed:06d}",
        seed=seed,
        age=int(np.clip(rng.normal(55, 15), 18, 90)),
        sex="F" if rng.random() < 0.5 else "M",
        edema=int(traits.edema_mm > 6),
        metastasis=metastasis,
        grade=grade,
        batch=batch,
        time_days=round(float(min(t_event, t_censor)), 1),
        event=int(t_event <= t_censor),
        oracle_lp=round(lp, 6),
        traits=traits,
    )


CLINICAL_COLUMNS = [
    "id",
    "time",
    "event",
    "age",
    "sex",
    "edema",
    "metastasis",
    "grade",
    "batch",
    "oracle_lp",
]


def write_clinical(path: Path, cases: list[Case]) -> None:
    """The clinical CSV (``id,time,event,...,oracle_lp``) the fitting commands read."""
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(CLINICAL_COLUMNS)
        for c in cases:
            writer.writerow(
                [
                    c.case_id,
                    c.time_days,
                    c.event,
                    c.age,
                    c.sex,
                    c.edema,
                    c.metastasis,
                    c.grade,
                    c.batch,
                    c.oracle_lp,
                ]
            )


def _write_case(args: tuple[Path, Case]) -> None:
    folder, case = args
    write_study(folder / case.case_id, case.seed, case.traits)


def write_cohort(
    out: Path, n: int, seed: int, *, images: bool = True, workers: int = 1
) -> list[Case]:
    """Write ``n`` studies under ``out/cases/<id>/`` plus ``clinical.csv`` and ``cohort.json``.

    ``workers`` > 1 renders studies in parallel processes; every study depends
    on its own seed only, so the files are the same either way.
    """
    out.mkdir(parents=True, exist_ok=True)
    cases = [draw_case(seed * 100_000 + i) for i in range(n)]
    if images:
        jobs = [(out / "cases", case) for case in cases]
        if workers > 1:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                list(pool.map(_write_case, jobs))
        else:
            for job in jobs:
                _write_case(job)
    write_clinical(out / "clinical.csv", cases)
    (out / "cohort.json").write_text(
        json.dumps(
            {
                "n": n,
                "seed": seed,
                "model": {
                    "coefficients": COEFFICIENTS,
                    "weibull_scale_days": WEIBULL_SCALE_D,
                    "weibull_shape": WEIBULL_SHAPE,
                    "admin_censoring_days": ADMIN_CENSOR_D,
                },
                "traits": {c.case_id: asdict(c.traits) for c in cases},
                "note": NOT_CLINICAL,
            },
            indent=2,
        )
    )
    return cases
