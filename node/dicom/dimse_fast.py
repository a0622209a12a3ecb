"""C-STORE command sets read and written by hand, without pydicom (the receive fast lane).

Every C-STORE cost pynetdicom a pydicom decode of the request's command set
(our guard decoded it once more), a pydicom ``Dataset`` for the File Meta
Information, UID validation of each field of the request primitive and a
pydicom encode of the response: about a third of the CPU the receive path
spends per instance (py-spy, bench/README.md). A command set is a handful of
group 0000 elements in Implicit VR Little Endian (PS3.7 E.1), so the common
case is read and written here directly:

- :func:`parse_store_request` reads a C-STORE-RQ command set made only of the
  elements PS3.7 9.3.1.1 defines, each with the length its VR gives, and
  returns ``None`` for anything else (another command, an unknown element, an
  odd length, a value that is not ASCII): the caller then uses the full pydicom
  decode (:func:`node.dicom.inbound.decode_command`), so what is unusual is
  still judged exactly as before.
- :func:`encode_store_response` writes the C-STORE-RSP command set byte for
  byte as pynetdicom 3.0.4 encodes it (tests/unit/test_fast_lane.py compares
  the two for Success, warnings and failures with an Error Comment).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from node.store.spool import ui_value

__all__ = ["StoreRequest", "encode_store_response", "parse_store_request"]

#: Command Field of a C-STORE-RQ / C-STORE-RSP (PS3.7 E.1).
C_STORE_RQ = 0x0001
C_STORE_RSP = 0x8001
#: Command Data Set Type "no data set" (PS3.7 E.1).
NO_DATA_SET = 0x0101

# The elements of a C-STORE-RQ (PS3.7 9.3.1.1): element number -> value kind.
_US, _UL, _UI, _AE = "US", "UL", "UI", "AE"
_REQUEST_ELEMENTS = {
    0x0000: _UL,  # Command Group Length
    0x0002: _UI,  # Affected SOP Class UID
    0x0100: _US,  # Command Field
    0x0110: _US,  # Message ID
    0x0700: _US,  # Priority
    0x0800: _US,  # Command Data Set Type
    0x1000: _UI,  # Affected SOP Instance UID
    0x1030: _AE,  # Move Originator Application Entity Title
    0x1031: _US,  # Move Originator Message ID
}
_FIXED = {_US: 2, _UL: 4}


@dataclass(frozen=True)
class StoreRequest:
    """What the node needs of a C-STORE-RQ command set."""

    message_id: int
    sop_class_uid: str
    sop_instance_uid: str
    data_set_type: int


def parse_store_request(raw: bytes) -> StoreRequest | None:
    """Read a plain C-STORE-RQ command set; ``None`` when it is anything else.

    ``None`` means "not read here", not "invalid": the caller decodes such a
    command set the slow way, which judges it. A returned request has a
    Message ID, a Command Data Set Type and both UIDs (without the trailing
    NUL or space padding pydicom strips), and each element appears
    once, in ascending order, as PS3.5 7.1 requires.
    """
    values: dict[int, int | str] = {}
    pos, end, last = 0, len(raw), -1
    while pos < end:
        if pos + 8 > end:
            return None
        group, element, length = struct.unpack_from("<HHL", raw, pos)
        pos += 8
        kind = _REQUEST_ELEMENTS.get(element)
        if group != 0 or kind is None or element <= last or pos + length > end:
            return None
        last = element
        if kind in _FIXED:
            if length != _FIXED[kind]:
                return None
            values[element] = struct.unpack_from("<H" if kind == _US else "<L", raw, pos)[0]
        else:
            try:
                values[element] = raw[pos : pos + length].decode("ascii").rstrip("\0 ")
            except UnicodeDecodeError:
                return None
        pos += length
    message_id, field, data_set_type = values.get(0x0110), values.get(0x0100), values.get(0x0800)
    sop_class, sop_instance = values.get(0x0002), values.get(0x1000)
    if field != C_STORE_RQ or not isinstance(message_id, int) or not isinstance(data_set_type, int):
        return None
    if not (isinstance(sop_class, str) and sop_class and isinstance(sop_instance, str)):
        return None
    if not sop_instance:
        return None
    return StoreRequest(message_id, sop_class, sop_instance, data_set_type)


def _element(element: int, value: bytes) -> bytes:
    return struct.pack("<HHL", 0x0000, element, len(value)) + value


def encode_store_response(
    message_id: int,
    sop_class_uid: str,
    sop_instance_uid: str,
    status: int,
    error_comment: str | None = None,
) -> bytes:
    """The C-STORE-RSP command set (Implicit VR Little Endian), as pynetdicom encodes it.

    Elements in tag order: Command Group Length, Affected SOP Class UID,
    Command Field, Message ID Being Responded To, Command Data Set Type (none),
    Status, Error Comment (when given; LO, space-padded to even length) and
    Affected SOP Instance UID. The UIDs are ASCII (the request's, which
    :func:`parse_store_request` read as ASCII).
    """
    body = [
        _element(0x0002, ui_value(sop_class_uid)),
        _element(0x0100, struct.pack("<H", C_STORE_RSP)),
        _element(0x0120, struct.pack("<H", message_id)),
        _element(0x0800, struct.pack("<H", NO_DATA_SET)),
        _element(0x0900, struct.pack("<H", status)),
    ]
    if error_comment is not None:
        comment = error_comment.encode("ascii", "replace")
        body.append(_element(0x0902, comment + b" " if len(comment) % 2 else comment))
    body.append(_element(0x1000, ui_value(sop_instance_uid)))
    payload = b"".join(body)
    return _element(0x0000, struct.pack("<L", len(payload))) + payload
