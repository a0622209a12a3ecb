"""The PHI filter masks patient attributes if a library ever logs a dataset."""

from __future__ import annotations

import logging

import pytest

from node.logs import PHIFilter


@pytest.mark.parametrize(
    "message",
    [
        "(0010,0010) Patient's Name                      PN: 'Doe^Jane'",
        "PatientID=A123456 in study",
        "patient_name: Doe^Jane",
    ],
)
def test_patient_values_are_masked(message: str) -> None:
    record = logging.LogRecord("x", logging.INFO, __file__, 1, message, None, None)
    PHIFilter().filter(record)
    text = record.getMessage()
    assert "Doe^Jane" not in text and "A123456" not in text
    assert "***" in text


def test_ordinary_lines_are_untouched() -> None:
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "series %s stable", ("1.2.3",), None)
    PHIFilter().filter(record)
    assert record.getMessage() == "series 1.2.3 stable"
