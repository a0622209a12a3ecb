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


def format_record(message: str, *args: object, exc: BaseException | None = None) -> str:
    """A record through the node's filter and formatter, as a handler writes it."""
    from node.logs import SafeFormatter

    exc_info = (type(exc), exc, exc.__traceback__) if exc is not None else None
    record = logging.LogRecord("pydicom", logging.WARNING, __file__, 1, message, args, exc_info)
    assert PHIFilter().filter(record)
    return SafeFormatter("%(levelname)s %(name)s: %(message)s").format(record)


def test_element_values_in_library_warnings_are_withheld() -> None:
    text = format_record(
        "Invalid value for VR UI: 'Probe^Phineas^Zeta'. Unknown encoding \"QX-991\" in %s",
        "SpecificCharacterSet",
    )
    assert "Probe" not in text and "QX-991" not in text
    assert "'<value withheld>'" in text
    # Names, VRs and UIDs are not values: they stay readable.
    kept = format_record("tag 'PatientName' VR 'PN' syntax '1.2.840.10008.1.2.1'")
    assert "'PatientName'" in kept and "'PN'" in kept and "'1.2.840.10008.1.2.1'" in kept


def test_peer_strings_cannot_forge_a_line_or_colour_the_terminal() -> None:
    text = format_record("refusing association from %s", "A\r\n2026-01-01 INFO forged\x1b[31m")
    assert "\n" not in text and "\r" not in text and "\x1b" not in text
    assert "A\\r\\n2026-01-01 INFO forged\\x1b[31m" in text


def test_tracebacks_keep_their_lines_marked_and_values_withheld() -> None:
    from node.logs import CONTINUATION

    try:
        int("Doe^Jane\n2026-01-01 00:00:00,000 INFO forged")
    except ValueError as exc:
        text = format_record("store failed", exc=exc)
    first, *rest = text.split("\n")
    assert first == "WARNING pydicom: store failed"
    assert rest and all(line.startswith(CONTINUATION) for line in rest)
    assert "Doe^Jane" not in text
    assert any('File "' in line for line in rest)  # frames stay readable


def test_serve_logging_captures_warnings_and_thread_exceptions() -> None:
    """What ``setup_logging`` does to a process: run it in one of its own."""
    import subprocess
    import sys

    script = (
        "import threading, warnings\n"
        "from node.logs import setup_logging\n"
        "setup_logging('INFO')\n"
        "import pydicom.valuerep as v\n"
        "v.validate_value('UI', 'Probe^Phineas^Zeta', 1)\n"
        "warnings.warn(\"Invalid value for VR DA: 'Zeta^Secret'\")\n"
        "def boom():\n"
        "    raise ValueError(\"bad value 'Doe^Hidden'\")\n"
        "t = threading.Thread(target=boom, name='worker'); t.start(); t.join()\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    err = proc.stderr
    for value in ("Probe^Phineas^Zeta", "Zeta^Secret", "Doe^Hidden"):
        assert value not in err, err
    assert "py.warnings" in err and "thread worker ended by ValueError" in err


def test_scheduler_and_migration_names_stay_readable() -> None:
    from node.logs import SafeFormatter

    record = logging.LogRecord(
        "apscheduler.scheduler", logging.WARNING, __file__, 1, "job %r skipped\x1b", ("tick",), None
    )
    assert PHIFilter().filter(record)
    text = SafeFormatter("%(message)s").format(record)
    assert text == "job 'tick' skipped\\x1b"
