"""One timed extraction mode for bench/radiomics.py, in its own process (fair memory figures).

Usage: radiomics_runner.py FOLDER MODE WORKERS PARAMS OUT, MODE = baseline | sarcnode | warm.
``sarcnode`` starts its worker pool inside the timed region (a one-off
command); ``warm`` starts it before the timer, as ``extract_cohort`` and a
running service do (one pool for many studies).
"""

from __future__ import annotations

import json
import logging
import resource
import sys
import time
from pathlib import Path

import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
# This folder holds a radiomics.py: keep it off the path or it hides PyRadiomics.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO / "bench"]
sys.path.insert(0, str(REPO))

from pipelines.radiomics.extract import extract, load_params, worker_pool  # noqa: E402


def main() -> None:
    """Load the prepared images and regions, run MODE, write seconds, peak RSS and values."""
    folder, mode, workers, params_path, out = sys.argv[1:6]
    params = load_params(Path(params_path))
    index = json.loads((Path(folder) / "index.json").read_text())
    images = {r: sitk.ReadImage(str(Path(folder) / f)) for r, f in index["images"].items()}
    regions = {
        r: {n: sitk.ReadImage(str(Path(folder) / f)) for n, f in named.items()}
        for r, named in index["regions"].items()
    }
    values: dict[str, dict[str, float]] = {}
    pool = None
    if mode == "warm":
        pool = worker_pool(int(workers))
        for future in [pool.submit(time.sleep, 0.2) for _ in range(int(workers))]:
            future.result()
    start = time.perf_counter()
    if mode == "baseline":
        from radiomics import featureextractor  # type: ignore[attr-defined]

        logging.getLogger("radiomics").setLevel(logging.ERROR)
        for role, named in regions.items():
            for name, mask in named.items():
                extractor = featureextractor.RadiomicsFeatureExtractor(params)
                result = extractor.execute(images[role], mask)
                values[f"{role}:{name}"] = {
                    k: float(v) for k, v in result.items() if not k.startswith("diagnostics_")
                }
    else:
        table = extract(images, regions, params, workers=int(workers), pool=pool)
        features = [c for c in table.columns if c not in ("study", "sequence", "region", "note")]
        for _, row in table.iterrows():
            values[f"{row['sequence']}:{row['region']}"] = {k: float(row[k]) for k in features}
    seconds = time.perf_counter() - start
    if pool is not None:
        pool.shutdown()
    rss = max(
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
    )
    Path(out).write_text(
        json.dumps({"seconds": seconds, "maxrss_mb": rss / 1024, "values": values})
    )


if __name__ == "__main__":
    main()
