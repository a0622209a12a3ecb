"""Radiomics benchmark: the project's extraction against plain sequential PyRadiomics.

One study, both sequences (T1, FS-T2), all regions (tumour, 10 mm ring,
three habitats), the full parameter file (config/radiomics/mr-default.yaml:
Original + LoG sigma 1/2/3 mm + wavelet; shape, first order, GLCM, GLRLM,
GLSZM, GLDM, NGTDM). Regions and prepared images are made once, written to
a temp folder, and then each mode runs in its own fresh Python process:

(a) baseline: one ``RadiomicsFeatureExtractor(params).execute(image, mask)``
    per (sequence, region), one after the other;
(b) sarcnode: ``pipelines.radiomics.extract.extract`` with ``--workers``
    processes (default: the CPUs this process may use), the pool started
    inside the timed region (a one-off ``sarcnode radiomics`` run);
(c) warm: the same with the pool started before the timer, as
    ``extract_cohort`` and the service hold it (one pool, many studies).

Printed: wall seconds of each, the ratios (baseline / sarcnode), peak
resident memory of each process tree (ru_maxrss of the process and of its
children), and whether every value is identical. Study: the synthetic study
of seed 21 (``--study DIR`` for another synthetic study folder).

Run: ``.venv/bin/python bench/radiomics.py [--workers N] [--json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# This folder holds a radiomics.py: keep it off the path or it hides PyRadiomics.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO / "bench"]
sys.path.insert(0, str(REPO))


def main() -> int:
    """Prepare one study's regions, time both modes in fresh processes, compare values."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--study", type=Path, default=None)
    parser.add_argument(
        "--params", type=Path, default=REPO / "config" / "radiomics" / "mr-default.yaml"
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    import SimpleITK as sitk

    from pipelines.io.dicom import load_series, scan
    from pipelines.radiomics.study import study_regions
    from pipelines.synth.study import write_study

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        study = args.study
        if study is None:
            study = folder / "study"
            write_study(study, 21)
        images = {r: load_series(scan(study / "dicom" / r).series[0]) for r in ("T1", "T2FS")}
        masks = {r: sitk.ReadImage(str(study / "masks" / f"{r}_tumour.nii.gz")) for r in images}
        prepared, regions, _ = study_regions(images, masks)
        index: dict[str, dict[str, Any]] = {"images": {}, "regions": {}}
        for role, image in prepared.items():
            sitk.WriteImage(image, str(folder / f"{role}.nrrd"))
            index["images"][role] = f"{role}.nrrd"
            index["regions"][role] = {}
            for name, mask in regions[role].items():
                sitk.WriteImage(mask, str(folder / f"{role}_{name}.nrrd"))
                index["regions"][role][name] = f"{role}_{name}.nrrd"
        (folder / "index.json").write_text(json.dumps(index))
        runs = {}
        runner = REPO / "bench" / "radiomics_runner.py"
        for mode in ("baseline", "sarcnode", "warm"):
            out = folder / f"{mode}.json"
            command = [sys.executable, str(runner), str(folder), mode, str(args.workers)]
            subprocess.run([*command, str(args.params), str(out)], check=True)
            runs[mode] = json.loads(out.read_text())
    base, ours, warm = runs["baseline"], runs["sarcnode"], runs["warm"]
    identical = base["values"] == ours["values"] == warm["values"]
    differing = _differences(base["values"], ours["values"])
    differing += _differences(base["values"], warm["values"])
    n_values = sum(len(v) for v in base["values"].values())
    summary = {
        "regions": len(base["values"]),
        "values": n_values,
        "workers": args.workers,
        "baseline_s": round(base["seconds"], 2),
        "sarcnode_s": round(ours["seconds"], 2),
        "warm_s": round(warm["seconds"], 2),
        "speedup": round(base["seconds"] / ours["seconds"], 2),
        "speedup_warm": round(base["seconds"] / warm["seconds"], 2),
        "baseline_maxrss_mb": round(base["maxrss_mb"], 1),
        "sarcnode_maxrss_mb": round(ours["maxrss_mb"], 1),
        "identical": identical,
        "differing_values": len(differing),
        "max_relative_difference": max((d for _, d in differing), default=0.0),
        "differing_features": sorted({k.split(":", 2)[-1] for k, _ in differing})[:20],
    }
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"{summary['regions']} regions, {n_values} values, params {args.params.name}")
        print(
            f"plain sequential PyRadiomics: {summary['baseline_s']:8.2f} s, "
            f"peak RSS {summary['baseline_maxrss_mb']:.0f} MB"
        )
        print(
            f"sarcnode ({args.workers} workers):      {summary['sarcnode_s']:8.2f} s, "
            f"peak RSS {summary['sarcnode_maxrss_mb']:.0f} MB (largest process)"
        )
        print(f"sarcnode, pool already started:  {summary['warm_s']:8.2f} s")
        print(
            f"speed-up {summary['speedup']}x (pool started in the run), "
            f"{summary['speedup_warm']}x (warm pool); values identical: {identical}"
        )
        if differing:
            print(
                f"{len(differing)} values differ, largest relative difference "
                f"{summary['max_relative_difference']:.3g}: "
                + ", ".join(summary["differing_features"])
            )
    return 0 if identical else 1


def _differences(
    base: dict[str, dict[str, float]], ours: dict[str, dict[str, float]]
) -> list[tuple[str, float]]:
    """(region:feature, relative difference) for every value that is not bit-identical."""
    out = []
    for unit, values in base.items():
        for name, a in values.items():
            b = ours.get(unit, {}).get(name, float("nan"))
            if a != b and not (a != a and b != b):
                out.append((f"{unit}:{name}", abs(a - b) / max(abs(a), abs(b), 1e-300)))
    return out


if __name__ == "__main__":
    raise SystemExit(main())
