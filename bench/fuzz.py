"""The long fuzz run: seeded hostile input against a real ``sarcnode serve``; prints figures.

    .venv/bin/python bench/fuzz.py --n 10000 --seed 7
    .venv/bin/python bench/fuzz.py --n 2000 --classes mutation odd_files --keep

The inputs are split over the classes of ``tests/fuzz/generator.py`` by
their weights (about 20 % structure-aware mutations of real MR files); the
node runs on a free loopback port under a temporary folder (kept with
``--keep``). After each class the node is checked (alive, statuses, nothing
outside the root, no orphans, ``audit verify``, RSS, PHI in its logs: see
``tests/fuzz/harness.py``). Prints inputs sent per class, crashes, orphans,
PHI lines, wrong-class statuses, RSS peak and wall time; exits 1 when a check
failed, so it can gate a release.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.fuzz.corpus import Corpus  # noqa: E402
from tests.fuzz.generator import CLASSES, counts_for  # noqa: E402
from tests.fuzz.harness import Campaign, FuzzNode, Totals, report  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000, help="inputs in all (default 10000)")
    parser.add_argument("--seed", type=int, default=1, help="the generator's seed")
    parser.add_argument("--classes", nargs="*", choices=sorted(CLASSES), help="only these")
    parser.add_argument(
        "--shared-dicom",
        type=Path,
        default=REPO.parent / "shared" / "data" / "dicom",
        help="real MR files to mutate (skipped when absent)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the node's folder and logs")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()

    counts = counts_for(args.n)
    if args.classes:
        weight = sum(counts[c] for c in args.classes)
        counts = {c: max(1, round(counts[c] * args.n / weight)) for c in args.classes}
    shared = args.shared_dicom if args.shared_dicom.is_dir() else None
    corpus = Corpus.load(shared)
    print(
        f"corpus: {len(corpus.mr)} MR templates ({len(corpus.mr) - len(corpus.synthetic)} real), "
        f"{len(corpus.odd)} odd files; {sum(counts.values())} inputs, seed {args.seed}",
        file=sys.stderr,
    )
    work = Path(tempfile.mkdtemp(prefix="sarcnode-fuzz-"))
    node = FuzzNode.create(work / "a" / "b" / "c" / "node")
    node.start()
    started = time.monotonic()
    try:
        campaign = Campaign(node, corpus, args.seed, progress=lambda m: print(m, file=sys.stderr))
        results = campaign.run(counts)
    finally:
        exit_code = node.stop()
    totals = Totals.of(results, campaign, time.monotonic() - started)
    print(report(results, totals, seed=args.seed))
    print(f"serve stopped with exit code {exit_code} (SIGTERM); node folder {node.base}")
    if args.json:
        figures = {
            "seed": args.seed,
            "totals": asdict(totals),
            "classes": [{**asdict(r), "outcomes": dict(r.outcomes)} for r in results],
        }
        args.json.write_text(json.dumps(figures, indent=2, default=str))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    clean = all(r.clean for r in results) and exit_code == 0 and totals.peak_rss_mb < 500
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main())
