"""Test hooks: fault injection for the crash and retry tests, inert unless a test turns it on.

Product code reaches this module through one call only: the job worker asks
:func:`fault_hook` once per job and gets ``None`` unless a test set
``SARCNODE_TEST_FAULT`` (for a ``serve`` it starts, in that process'
environment; in its own process, with :func:`inject`). The value names a
stage and what happens there::

    segment:pause=120     sleep 120 s after the stage's work, before its checkpoint
                          (a crash test kills the node at a known point)
    score:raise=KeyError  raise KeyError inside the stage (a bug in our code)
    segment:raise=GeometryError   raise bad input inside the stage

Only the exception classes in :data:`RAISABLE` can be raised. A malformed
value raises :class:`ValueError` naming it, so a typo in a test never
silently injects nothing.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from dataclasses import dataclass

from pipelines.errors import GeometryError, NoTumourError

FAULT_ENV = "SARCNODE_TEST_FAULT"

#: What a fault may raise: a bug (KeyError, RuntimeError), a resource (OSError), bad input.
RAISABLE: dict[str, type[Exception]] = {
    "KeyError": KeyError,
    "RuntimeError": RuntimeError,
    "OSError": OSError,
    "GeometryError": GeometryError,
    "NoTumourError": NoTumourError,
}


@dataclass(frozen=True)
class Fault:
    """One injected fault: at ``stage``, pause ``pause_s`` before the checkpoint, or raise."""

    stage: str
    pause_s: float = 0.0
    raises: str | None = None

    def __post_init__(self) -> None:
        """Refuse an exception class outside :data:`RAISABLE` and a negative pause."""
        if self.raises is not None and self.raises not in RAISABLE:
            raise ValueError(f"{FAULT_ENV}: cannot raise {self.raises!r} ({sorted(RAISABLE)})")
        if self.pause_s < 0:
            raise ValueError(f"{FAULT_ENV}: pause must be 0 or more seconds")

    @property
    def spec(self) -> str:
        """The environment value that describes this fault."""
        what = f"raise={self.raises}" if self.raises else f"pause={self.pause_s:g}"
        return f"{self.stage}:{what}"

    @property
    def env(self) -> dict[str, str]:
        """The environment entry that turns this fault on in a process started with it."""
        return {FAULT_ENV: self.spec}

    def before_stage(self, stage: str) -> None:
        """Raise the fault's exception when ``stage`` is its stage (the stage's work is skipped)."""
        if self.raises and stage == self.stage:
            raise RAISABLE[self.raises](f"injected by {FAULT_ENV} in the {stage} stage")

    def before_checkpoint(self, stage: str) -> None:
        """Sleep the pause when ``stage`` is its stage (after the work, before the checkpoint)."""
        if self.pause_s and stage == self.stage:
            time.sleep(self.pause_s)


def parse(spec: str) -> Fault:
    """The fault a ``SARCNODE_TEST_FAULT`` value describes (see the module)."""
    stage, _, what = spec.partition(":")
    key, _, value = what.partition("=")
    if not stage or not value or key not in ("pause", "raise"):
        raise ValueError(f"{FAULT_ENV}={spec!r}: expected <stage>:pause=<s> or <stage>:raise=<X>")
    if key == "raise":
        return Fault(stage, raises=value)
    try:
        return Fault(stage, pause_s=float(value))
    except ValueError as exc:
        raise ValueError(f"{FAULT_ENV}={spec!r}: {exc}") from exc


def fault_hook() -> Fault | None:
    """The fault a test turned on for this process, or None (always, outside tests)."""
    spec = os.environ.get(FAULT_ENV)
    return parse(spec) if spec else None


@contextmanager
def inject(fault: Fault, environ: MutableMapping[str, str] | None = None) -> Iterator[Fault]:
    """Turn ``fault`` on in ``environ`` (this process' by default) for the ``with`` block."""
    env = os.environ if environ is None else environ
    before = env.get(FAULT_ENV)
    env[FAULT_ENV] = fault.spec
    try:
        yield fault
    finally:
        if before is None:
            env.pop(FAULT_ENV, None)
        else:
            env[FAULT_ENV] = before
