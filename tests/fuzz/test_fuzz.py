"""The bounded fuzz run of ``make test``: every class against a real ``sarcnode serve``.

About 330 seeded inputs over the 17 classes of :mod:`tests.fuzz.generator`
(about a minute on two cores), each class followed by the checks of
:mod:`tests.fuzz.harness`. ``SARCNODE_FUZZ_SEED`` picks another seed (the
report names the one used); ``bench/fuzz.py`` runs the long campaign.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tests.conftest import SHARED_DATA, shared_data
from tests.fuzz.corpus import Corpus
from tests.fuzz.harness import Campaign, FuzzNode, Totals, report

pytestmark = [pytest.mark.integration, pytest.mark.slow]

#: Inputs per class: every hostile value list once over, the costly classes fewer.
BOUNDED = {
    "truncated": 24,
    "random_bytes": 20,
    "hostile_uids": 36,
    "huge_lengths": 20,
    "deep_nesting": 16,
    "corrupt_deflate": 20,
    "deflate_bomb": 6,
    "mutation": 40,
    "odd_files": 30,
    "foreign_objects": 16,
    "foreign_series": 12,
    "duplicates": 12,
    "phi_planted": 24,
    "ae_titles": 16,
    "command": 20,
    "network": 20,
    "oversize": 2,
}
#: serve's peak RSS may not pass this (issue 13: under 500 MB under hostile input).
RSS_LIMIT_MB = 500


def test_bounded_fuzz_run_leaves_the_node_sound(tmp_path: Path) -> None:
    seed = int(os.environ.get("SARCNODE_FUZZ_SEED", "20261203"))
    real = SHARED_DATA / "dicom"
    corpus = Corpus.load(
        shared_data("dicom") if real.exists() or os.environ.get("CI") == "true" else None
    )
    # Deep enough that the hostile UIDs' ../ chains would land inside tmp_path.
    node = FuzzNode.create(tmp_path / "a" / "b" / "c" / "node")
    node.start()
    started = time.monotonic()
    try:
        campaign = Campaign(node, corpus, seed)
        results = campaign.run(BOUNDED)
    finally:
        exit_code = node.stop()
    totals = Totals.of(results, campaign, time.monotonic() - started)
    text = report(results, totals, seed=seed)
    print(text)
    assert exit_code == 0, f"serve exited {exit_code} on SIGTERM\n{text}"
    assert totals.inputs >= 300
    assert totals.planted_studies > 0, (
        "no planted patient value reached the index: PHI check is blind"
    )
    unclean = [r.name for r in results if not r.clean]
    assert not unclean, f"classes with a failed check: {unclean}\n{text}"
    assert totals.peak_rss_mb < RSS_LIMIT_MB, text
    assert not list(tmp_path.rglob("sarcnode-fuzz-escape*"))
