"""UID and AE title validation: what may become a path, what may be an AE."""

from __future__ import annotations

import pytest

from node.dicom.validate import validate_ae_title, validate_uid


@pytest.mark.parametrize(
    "uid", ["1.2.840.10008.5.1.4.1.1.4", "1.2.3", "2.25.329800735698586629295641978511506172918"]
)
def test_valid_uids(uid: str) -> None:
    assert validate_uid(uid) == (True, "")


@pytest.mark.parametrize(
    ("uid", "why"),
    [
        ("1.2/../../x", "only digits"),
        ("../etc/passwd", "only digits"),
        ("1.2.3\x00", "only digits"),
        ("", "empty"),
        ("1." + "2" * 63, "max 64"),
        ("1..2", "empty component"),
        (".1.2", "empty component"),
        (None, "must be a string"),
    ],
)
def test_invalid_uids_name_the_reason(uid: object, why: str) -> None:
    ok, reason = validate_uid(uid)
    assert not ok
    assert why in reason


def test_ae_titles() -> None:
    assert validate_ae_title("PACS_MAIN")[0]
    assert not validate_ae_title("")[0]
    assert not validate_ae_title("A" * 17)[0]
    assert not validate_ae_title("BAD\\AE")[0]
