"""Candidate signature recipes on the real sarcoma cohort, each nested-cross-validated.

    .venv/bin/python bench/signature_candidates.py [--repeats 10] [--cache var/sts] [--json]

Needs the feature cache that ``sarcnode signature-cv`` (``make signatures-real``)
writes. For each endpoint it runs the same outer splits (5 folds x ``--repeats``)
for several recipes and prints the nested-CV AUC / Harrell's C with its CI.

This is a sensitivity table, not a model choice: picking the best row would be
one more data-driven step outside the nested CV (with ~38 patients the spread
between rows is within chance). The shipped cards keep the pre-declared default
recipe (``Recipe()``); the README and the note report every row.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipelines.signature.nested import Recipe, nested_cv, summarise  # noqa: E402
from pipelines.signature.real import outcome_of  # noqa: E402
from pipelines.signature.sts import ENDPOINTS, load_sts, read_cache  # noqa: E402

DATA = ROOT.parent / "shared" / "data"

CANDIDATES: dict[str, tuple[Recipe, bool]] = {
    "default (ICC>0.75, p<0.10, mRMR 10, LASSO)": (Recipe(), True),
    "compact (mRMR 3)": (Recipe(mrmr_k=3), True),
    "strict filter (p<0.05, mRMR 5)": (Recipe(univariate_p=0.05, mrmr_k=5), True),
    "no ICC filter": (Recipe(), False),
}


def main() -> None:
    """Print (or emit as JSON) each candidate's nested-CV figure per endpoint."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=ROOT / "var" / "sts")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if not (args.cache / "features.csv").is_file():
        sys.exit(f"no feature cache in {args.cache}: run `make signatures-real` first")
    cohort = load_sts(DATA / "sts-clinical" / "clinical.csv", DATA / "sts-t1-cropped")
    features, raters = read_cache(args.cache)
    assert raters is not None
    rows = []
    for endpoint in ENDPOINTS:
        clinical, outcome = outcome_of(cohort, endpoint)
        x = features.loc[clinical.index]
        rx = [r.loc[clinical.index] for r in raters]
        for name, (recipe, icc) in CANDIDATES.items():
            result = nested_cv(
                x, outcome, recipe, rx if icc else None, folds=5, repeats=args.repeats, seed=0
            )
            s = summarise(outcome, result)
            rows.append({"endpoint": endpoint, "recipe": name, **s})
            if not args.json:
                print(
                    f"{endpoint:16s} {name:44s} {s['metric']} {s['value']:.3f} "
                    f"(95% CI {s['ci95'][0]:.3f}-{s['ci95'][1]:.3f})",
                    flush=True,
                )
    if args.json:
        print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
