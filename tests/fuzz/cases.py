"""What a fuzz case is: one request or connection and the outcomes that are right for it.

The statuses the node answers with (named once), the presentation contexts the
fuzz proposes, and the three kinds of case the generators yield: a C-STORE
(:class:`StoreCase`), an association request (:class:`AssociateCase`) and a
raw-socket attack (:class:`NetCase`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MRImageStorage,
)

from tests.fuzz.corpus import (
    FOREIGN_CLASSES,
    MR_FAMILY,
    TAG_PIXEL_DATA,
    Element,
    Instance,
    Template,
)
from tests.fuzz.dimse import (
    VERIFICATION,
    Outcome,
)

SUCCESS = 0x0000
WARNING_KEPT_FIRST = 0xB006
OUT_OF_RESOURCES = 0xA700
MISMATCH = 0xA900
NOT_SUPPORTED = 0x0122
CANNOT_UNDERSTAND = 0xC000
#: A success or the failures a malformed but decodable data set may earn.
STORED_OR_REFUSED = frozenset({SUCCESS, CANNOT_UNDERSTAND, MISMATCH})

#: Every context the fuzz proposes: MR classes in every syntax the node accepts, plus
#: classes it refuses (so a case can send on a rejected context) and Verification.
STORAGE_SYNTAXES: tuple[str, ...] = (
    "1.2.840.10008.1.2",
    "1.2.840.10008.1.2.1",
    "1.2.840.10008.1.2.1.99",
    "1.2.840.10008.1.2.2",
    "1.2.840.10008.1.2.5",
    "1.2.840.10008.1.2.4.50",
    "1.2.840.10008.1.2.4.51",
    "1.2.840.10008.1.2.4.57",
    "1.2.840.10008.1.2.4.70",
    "1.2.840.10008.1.2.4.80",
    "1.2.840.10008.1.2.4.81",
    "1.2.840.10008.1.2.4.90",
    "1.2.840.10008.1.2.4.91",
    "1.2.840.10008.1.2.4.201",
    "1.2.840.10008.1.2.4.202",
    "1.2.840.10008.1.2.4.203",
)
PROPOSALS: tuple[tuple[str, str], ...] = (
    *((c, ts) for c in sorted(MR_FAMILY) for ts in STORAGE_SYNTAXES),
    *((c, ExplicitVRLittleEndian) for c in FOREIGN_CLASSES),
    (VERIFICATION, ImplicitVRLittleEndian),
)


@dataclass(frozen=True)
class StoreCase:
    """One C-STORE request, sent on the fuzz's (shared or own) association."""

    cls: str
    label: str
    #: The proposed context it is sent on: (abstract syntax, transfer syntax).
    context: tuple[str, str]
    sop_class: str | bytes | None
    sop_instance: str | bytes | None
    data_set: bytes | None
    expect: frozenset[Outcome]
    #: Command elements changed (a value) or dropped (None); Message ID is the runner's.
    command_changes: tuple[tuple[int, bytes | None], ...] = ()
    #: The whole command set, as sent (overrides everything above it).
    raw_command: bytes | None = None
    #: A context ID to use instead of the context's (e.g. one never proposed).
    context_id: int | None = None
    #: Sent on an association of its own (the expected outcome ends it).
    own_association: bool = False
    tokens: tuple[str, ...] = ()


@dataclass(frozen=True)
class AssociateCase:
    """An A-ASSOCIATE-RQ with raw AE title fields; the node must reject it."""

    cls: str
    label: str
    calling: bytes
    called: bytes | None
    expect: frozenset[Outcome]
    tokens: tuple[str, ...] = ()


#: A raw-socket step: ("send", bytes), ("drip", bytes), ("sleep", seconds),
#: ("associate", b"") (send an A-ASSOCIATE-RQ and read the A-ASSOCIATE-AC), ("close", b"").
Step = tuple[str, bytes | float]


@dataclass(frozen=True)
class NetCase:
    """A raw-socket attack: steps, then wait (up to ``limit_s``) for the node to end it."""

    cls: str
    label: str
    steps: tuple[Step, ...]
    expect: frozenset[Outcome]
    limit_s: float = 10.0
    tokens: tuple[str, ...] = ()


Case = StoreCase | AssociateCase | NetCase


def store_case(
    cls: str,
    label: str,
    inst: Instance,
    expect: Iterable[Outcome],
    data: bytes | None = None,
    **changes: Any,
) -> StoreCase:
    """A C-STORE of ``inst`` (or ``data`` in its place) on its template's context.

    ``changes`` override the other :class:`StoreCase` fields (the command's UIDs...).
    """
    t = inst.template
    fields: dict[str, Any] = {
        "context": (t.sop_class if t.sop_class in MR_FAMILY else MRImageStorage, t.syntax),
        "sop_class": t.sop_class,
        "sop_instance": inst.sop_instance,
        "data_set": inst.encode() if data is None else data,
        "tokens": tuple(inst.tokens),
    }
    fields.update(changes)
    return StoreCase(cls=cls, label=label, expect=frozenset(expect), **fields)


def native(templates: list[Template]) -> list[Template]:
    return [t for t in templates if not t.deflated]


def pixel_end(elements: list[Element]) -> int:
    """Offset just after the Pixel Data element (the data set's length if it has none)."""
    pos = 0
    for el in elements:
        pos += len(el.raw)
        if el.tag == TAG_PIXEL_DATA:
            return pos
    return pos
