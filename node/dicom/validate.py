"""Validators for values that arrive from the network or from config.

Each returns ``(ok, reason)``; the caller names the field, as pydicom's and
pynetdicom's validators do. A UID is untrusted input: it is checked here
before it becomes part of a file path.
"""

from __future__ import annotations

import re

_UID_CHARS_RE = re.compile(r"^[0-9.]+$")


def validate_uid(value: object) -> tuple[bool, str]:
    """Check a DICOM UID (PS3.5 9.1): digits and dots, at most 64 characters.

    Leading zeros in a component are tolerated (some old devices write them)
    but anything that is not a digit or a dot is refused, so a valid UID can
    always be used as a single path component.
    """
    if not isinstance(value, str):
        return False, f"must be a string, not {type(value).__name__}"
    if not value:
        return False, "is empty"
    if len(value) > 64:
        return False, f"is {len(value)} characters long (max 64)"
    if not _UID_CHARS_RE.match(value):
        return False, "may contain only digits and '.'"
    if value.startswith(".") or value.endswith(".") or ".." in value:
        return False, "has an empty component"
    return True, ""


def validate_ae_title(value: object) -> tuple[bool, str]:
    """Check an AE title (PS3.5 AE VR): 1-16 characters, no backslash or control chars."""
    if not isinstance(value, str):
        return False, f"must be a string, not {type(value).__name__}"
    stripped = value.strip()
    if not stripped:
        return False, "is empty"
    if len(value) > 16:
        return False, f"is {len(value)} characters long (max 16)"
    if "\\" in value or any(ord(c) < 32 or ord(c) > 126 for c in value):
        return False, "may contain only printable ASCII characters and no backslash"
    return True, ""


def resolve_sop_class(value: str) -> tuple[bool, str]:
    """Check that ``value`` names a storage SOP class, by keyword or UID."""
    from pydicom.uid import UID
    from pynetdicom import sop_class

    uid = getattr(sop_class, value, None)
    if uid is None:
        uid = UID(value)
        if not uid.is_valid or uid.name == uid:
            return False, f"{value!r} is not a known SOP class keyword or UID"
    if "Storage" not in UID(uid).name and "Storage" not in value:
        return False, f"{value!r} ({UID(uid).name}) is not a storage SOP class"
    return True, ""


def sop_class_uid(value: str) -> str:
    """The UID for a SOP class keyword or UID (validated by :func:`resolve_sop_class`)."""
    from pynetdicom import sop_class

    uid = getattr(sop_class, value, None)
    return str(uid) if uid is not None else value
