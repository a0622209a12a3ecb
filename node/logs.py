"""Logging set-up for the service and the CLI.

Log lines carry UIDs, AE titles and IPs, never patient name, ID or birth
date. :class:`PHIFilter` is a last line of defence: it masks values of the
DICOM patient attributes if a library ever formats a dataset into a message.
"""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path

_PHI_RE = re.compile(
    r"(?P<key>\(0010,00(?:10|20|30)\)|PatientName|PatientID|PatientBirthDate|"
    r"patient_name|patient_id)(?P<sep>[^\n]{0,40}?[:=]\s*|\s+[A-Z]{2}:?\s*)(?P<val>[^\n,;]*)"
)


class PHIFilter(logging.Filter):
    """Masks values that follow patient-identifying attribute names in a record."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Rewrite the formatted message with PHI values replaced by ``***``."""
        message = record.getMessage()
        if _PHI_RE.search(message):
            record.msg = _PHI_RE.sub(lambda m: f"{m['key']}{m['sep']}***", message)
            record.args = None
        return True


def setup_logging(level: str = "INFO", file: Path | None = None) -> None:
    """Configure root logging once: stderr, optional file, PHI filter on every handler."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if file is not None:
        file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(file, encoding="utf-8"))
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    for handler in handlers:
        handler.setFormatter(fmt)
        handler.addFilter(PHIFilter())
    logging.basicConfig(level=level, handlers=handlers, force=True)
    # pynetdicom logs every PDU at INFO/DEBUG, including dataset dumps at DEBUG.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
