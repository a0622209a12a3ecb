"""Segmentation benchmark: seconds per study, by step, on CPU and (when present) CUDA.

What it measures, per study and device, the median of ``--repeat`` runs
(after one warm-up run, which is reported separately: it includes loading
the weights and, on CUDA, kernel selection):

- load: scan the DICOM folder, build the FS-T2 and T1 volumes;
- preprocess: resampling to the coarse grid and normalisation;
- inference: coarse pass + fine pass (sliding windows) including the crop;
- postprocess: probabilities back to the input grid, components, holes;
- carry: rigid T1<->FS-T2 registration and the mask resampled onto T1;
- total: the sum, i.e. one study from DICOM files to both masks.

Studies: the real STS_001 pair (../shared/data/sts-raw/STS_001, 40 slices of
384x384 FS-T2 and 512x512 T1) and one synthetic study (seed 21). Threads:
torch uses what it finds (``torch.get_num_threads()`` is printed).

Run: ``.venv/bin/python bench/segment.py [--model models/sarcnode-seg-demo]
[--repeat 3] [--device auto|cpu|cuda|all] [--json]``. It prints figures; it
is not a test.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipelines.io.dicom import load_series, scan  # noqa: E402
from pipelines.io.roles import load_role_rules  # noqa: E402
from pipelines.preprocess import carry_mask, register_rigid  # noqa: E402
from pipelines.segment.infer import Segmenter  # noqa: E402
from pipelines.segment.study import choose_series  # noqa: E402
from pipelines.synth.study import write_study  # noqa: E402


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (platform.processor() is empty on Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def one_run(segmenter: Segmenter, folder: Path) -> dict[str, float]:
    """One study from files to both masks, timed by step."""
    rules = load_role_rules(REPO / "config" / "sequence_roles.yaml")
    t0 = time.perf_counter()
    chosen = choose_series(scan(folder), rules)
    t2 = load_series(chosen["T2FS"])
    t1 = load_series(chosen["T1"])
    times = {"load": time.perf_counter() - t0}
    if segmenter.device.type == "cuda":
        torch.cuda.synchronize()
    result = segmenter.segment(t2, "T2FS")
    times.update(result.seconds)
    t3 = time.perf_counter()
    registration = register_rigid(t1, t2)
    carry_mask(result.mask, t1, registration.transform)
    times["carry"] = time.perf_counter() - t3
    times["total"] = sum(times.values())
    return times


def main() -> int:
    """Parse options, time each (study, device), print a table or JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=REPO / "models" / "sarcnode-seg-demo")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--device", default="all", choices=["auto", "cpu", "cuda", "all"])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    devices = {
        "all": ["cpu", "cuda"] if cuda else ["cpu"],
        "auto": ["cuda" if cuda else "cpu"],
    }.get(args.device, [args.device])
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        studies = {"synthetic seed 21": Path(tmp) / "syn"}
        write_study(studies["synthetic seed 21"], 21)
        sts = REPO.parent / "shared" / "data" / "sts-raw" / "STS_001"
        if sts.is_dir():
            studies = {"STS_001 (real)": sts, **studies}
        for device in devices:
            segmenter = Segmenter(args.model, device)
            name = (
                torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu"
            )
            for study, folder in studies.items():
                warm = one_run(segmenter, folder)
                runs = [one_run(segmenter, folder) for _ in range(args.repeat)]
                median = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
                rows.append(
                    {
                        "study": study,
                        "device": f"{device} ({name})",
                        "first_run_s": round(warm["total"], 2),
                    }
                    | {f"{k}_s": round(v, 2) for k, v in median.items()}
                )
    if args.json:
        print(json.dumps({"threads": torch.get_num_threads(), "rows": rows}, indent=2))
        return 0
    from pipelines.segment.card import load_card
    from pipelines.segment.infer import members

    card = load_card(args.model)
    views = (card.get("ensemble") or {}).get("tta") or ["none"]
    print(
        f"model {args.model.name} {card.get('version')}: {len(members(card))} fine member(s), "
        f"{len(views)} test-time view(s) on the first; inference "
        f"{card['architecture']['fine'].get('inference', 'window')}; "
        f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads"
    )
    cols = [
        "load_s",
        "preprocess_s",
        "inference_s",
        "postprocess_s",
        "carry_s",
        "total_s",
        "first_run_s",
    ]
    print(f"{'study':<20} {'device':<28} " + " ".join(f"{c[:-2]:>11}" for c in cols))
    for r in rows:
        print(
            f"{r['study']:<20} {r['device'][:28]:<28} " + " ".join(f"{r[c]:>11.2f}" for c in cols)
        )
    print(f"median of {args.repeat} runs after one warm-up; seconds per study")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
