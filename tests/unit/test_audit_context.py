"""The audit anchor is written off the committing thread, and a write never blocks an append."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from node.audit.anchor import HeadAnchor
from node.audit.context import AuditConfig, AuditContext


@pytest.fixture
def ctx(tmp_path: Path) -> AuditContext:
    context = AuditContext(AuditConfig(tmp_path / "audit.key", tmp_path / "head.json"))
    context.keyring  # noqa: B018 (created here, not inside the timings below)
    return context


def test_a_commit_returns_before_the_anchor_is_written_and_it_is_written_soon(
    ctx: AuditContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    writers: list[str] = []
    release = threading.Event()
    real = HeadAnchor.advance

    def slow_advance(self: HeadAnchor, *args: object, **kwargs: object) -> bool:
        writers.append(threading.current_thread().name)
        release.wait(5)  # a slow disk: the two fsyncs take long
        return real(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(HeadAnchor, "advance", slow_advance)
    t0 = time.monotonic()
    ctx.committed(1, "a" * 64)
    assert time.monotonic() - t0 < 1.0  # did not wait for the write
    deadline = time.monotonic() + 5
    while not writers and time.monotonic() < deadline:
        time.sleep(0.01)
    assert writers and writers[0] != threading.current_thread().name
    # While the file is being written, the head committed is still known (an
    # append checks against it) without waiting for the write.
    ctx.committed(2, "b" * 64)
    seen: list[tuple[int, str] | None] = []
    reader = threading.Thread(target=lambda: seen.append(ctx.pending))
    reader.start()
    reader.join(1.0)
    assert seen == [(2, "b" * 64)]
    release.set()
    ctx.flush()
    anchor = ctx.anchor.read(ctx.keyring) if ctx.anchor else None
    assert anchor is not None and (anchor.seq, anchor.hash) == (2, "b" * 64)
    assert ctx.pending is None
