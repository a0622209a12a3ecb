"""Where a C-STORE's time goes inside ``sarcnode serve``: perf_counter spans per component.

Generates N 512x512 MR instances (as ``bench/ingest.py``), starts ``serve``
in a child process whose store path functions are wrapped with timers, sends
the instances over one association with dcmtk ``storescu``, stops serve
(SIGTERM) and prints, per wrapped function, calls and mean milliseconds per
call and per instance. Spans nest (``store`` holds ``read``, ``spool fsync``
and ``index txn``...), so they do not add up to a total. A function missing
from the tree measured is skipped, so one script measures before and after a
change: ``--tree DIR`` runs serve from another source tree (its ``node``
first on PYTHONPATH).

Run: ``.venv/bin/python bench/store_spans.py [--n 300] [--tree /tmp/before] [--json]``.
A measurement aid, not a test.
"""

from __future__ import annotations

import argparse
import atexit
import functools
import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: (label, module, attribute path): the functions timed in the serve child.
TARGETS = [
    ("handler (scp)", "node.dicom.scp", "StorageSCP._handle_store"),
    ("fast-lane handler", "node.dicom.scp", "StorageSCP._serve_fast"),
    ("store", "node.store.ingest", "Ingestor.store"),
    ("open spool", "node.store.ingest", "Ingestor.open_spool"),
    ("file meta encode", "node.store.ingest", "encode_meta"),
    ("header read", "node.store.ingest", "Ingestor._read"),
    ("spool fsync", "node.store.spool", "Spool.finish"),
    ("commit wait+txn", "node.store.ingest", "Ingestor._commit"),
    ("index txn", "node.store.group", "GroupCommitter._commit"),
    ("index work", "node.store.ingest", "Ingestor._index"),
    ("duplicate check", "node.store.ingest", "stored_instance"),
    ("series check", "node.store.ingest", "check_series"),
    ("rows", "node.store.ingest", "index_instance"),
    ("assoc counter", "node.store.ingest", "bump_association_counter"),
    ("audit event", "node.store.ingest", "audit_instance"),
    ("audit HMAC", "node.audit.trail", "event_mac"),
    ("audit head read", "node.audit.trail", "head_row"),
    ("audit anchor chk", "node.audit.trail", "anchor_findings"),
    ("place (rename)", "node.store.files", "InstanceFiles.place"),
    ("file+folder fsync", "node.store.files", "InstanceFiles.sync_placed"),
    ("file fsync", "node.store.files", "fsync_file"),
    ("path check", "node.store.files", "InstanceFiles.relative_path"),
    ("free disk", "node.store.files", "InstanceFiles.free_mb"),
    ("folder fsync", "node.store.files", "fsync_dir"),
    ("folder fsync", "node.store.group", "fsync_dir"),
    ("txn commit", "sqlalchemy.orm.session", "SessionTransaction.commit"),
]

_spans: dict[str, list[float]] = {}


def _timed(label: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    times = _spans.setdefault(label, [])

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            times.append(time.perf_counter() - t0)

    return wrapper


def _patch() -> None:
    for label, module_name, path in TARGETS:
        module = importlib.import_module(module_name)
        owner: Any = module
        *parents, name = path.split(".")
        try:
            for part in parents:
                owner = getattr(owner, part)
            fn = getattr(owner, name)
        except AttributeError:
            continue
        setattr(owner, name, _timed(label, fn))


def serve_child(config: str, out: str) -> None:
    """Run serve with the targets wrapped; write the spans to ``out`` at exit."""
    _patch()

    def dump() -> None:
        Path(out).write_text(json.dumps(_spans), encoding="utf-8")

    atexit.register(dump)
    from node.cli.main import app

    app(["serve", "--config", config], standalone_mode=False)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--tree", type=Path, help="run serve from this source tree")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--serve-child", nargs=2, metavar=("CONFIG", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve_child:
        serve_child(*args.serve_child)
        return 0
    sys.path.insert(0, str(Path(__file__).parent))
    import ingest  # bench/ingest.py: instances, config, readiness, sending

    root = Path(tempfile.mkdtemp(prefix="sarcnode-spans-"))
    try:
        data = root / "instances"
        data.mkdir()
        ingest.make_instances(data, args.n)
        port = ingest.free_port()
        argv, _env, _http = ingest._sarcnode(root, port, False)
        config = argv[-1]
        out = root / "spans.json"
        env = dict(os.environ)
        if args.tree is not None:
            env["PYTHONPATH"] = str(args.tree.resolve())
        cmd = [sys.executable, __file__, "--serve-child", config, str(out)]
        log = (root / "serve.log").open("wb")
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=log)
        try:
            ingest.wait_ready(proc, "SARCNODE", port, None)
            elapsed, failures = ingest.send("SARCNODE", port, [data])
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
            log.close()
        spans: dict[str, list[float]] = json.loads(out.read_text(encoding="utf-8"))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    rate = args.n / elapsed
    print(f"{args.n} instances, one association: {elapsed:.2f} s, {rate:.1f} inst/s, "
          f"{failures} storescu failures; tree {args.tree or 'this one'}")  # fmt: skip
    print(f"{'span':18} {'calls':>6} {'ms/call':>8} {'ms/inst':>8}")
    summary: dict[str, dict[str, float]] = {}
    for label in dict.fromkeys(label for label, _module, _path in TARGETS):
        times = spans.get(label)
        if not times:
            continue
        total_ms = sum(times) * 1000
        summary[label] = {"calls": len(times), "ms_per_inst": total_ms / args.n}
        print(f"{label:18} {len(times):6d} {total_ms / len(times):8.3f} {total_ms / args.n:8.3f}")
    if args.json:
        print(json.dumps({"n": args.n, "inst_per_s": rate, "spans": summary}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
