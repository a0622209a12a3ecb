r"""Logging set-up for the service and the CLI.

Log lines carry UIDs, AE titles and IPs, never patient name, ID or birth date,
and never the value of a DICOM element: a hostile sender can put a patient's
name into an element of any VR, and pydicom then quotes it in a warning
(``Invalid value for VR UI: 'Doe^Jane'``). Every record, on every handler,
goes through :func:`scrub`:

- values that follow patient attribute names are masked (``PatientName=***``);
- quoted literals (``'...'``, ``"..."``, ``b'...'``) are withheld, except DICOM
  keywords, VR codes and UIDs: quotes are how pydicom, Python exceptions and our
  own reasons mark a value. So quote a value you mean to hide, and write names
  you mean to show (an AE title, a path) unquoted;
- control characters are written as escapes (``\n``, ``\x1b``), so a peer
  string such as an AE title with CR/LF or ANSI codes stays inside its line.

Library warnings (pydicom's ``warnings.warn``) are captured into logging so
they are scrubbed too, and so are exceptions that end a thread. Tracebacks keep
their lines, each continuation prefixed with ``  | `` so that none can pass for
a record of its own.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
import warnings
from functools import cache
from pathlib import Path

_PHI_RE = re.compile(
    r"(?P<key>\(0010,00(?:10|20|30)\)|PatientName|PatientID|PatientBirthDate|"
    r"patient_name|patient_id)(?P<sep>[^\n]{0,40}?[:=]\s*|\s+[A-Z]{2}:?\s*)(?P<val>[^\n,;]*)"
)
# A quoted literal as repr() or an f-string writes it, not starting inside a word
# (so the apostrophe of "can't" opens nothing).
_QUOTED_RE = re.compile(r"""(?<![\w'"])b?(?P<q>['"])(?P<body>(?:\\.|(?!(?P=q))[^\\\n])*)(?P=q)""")
_UID_RE = re.compile(r"^[0-9]+(?:\.[0-9]+){3,}$")
_CONTROL_RE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_NAMED_CONTROLS = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
#: What a withheld value is replaced with.
WITHHELD = "<value withheld>"
#: Prefix of a traceback's continuation lines.
CONTINUATION = "  | "
#: Loggers of libraries that never see a data set: their quoted names (a job's,
#: a migration's) are kept; control characters are still escaped.
NO_DATA_LOGGERS = ("apscheduler", "alembic")


def printable(text: str) -> str:
    """``text`` with control characters written as escapes: one line, no terminal codes."""

    def escape(m: re.Match[str]) -> str:
        char = m[0]
        named = _NAMED_CONTROLS.get(char)
        if named:
            return named
        return f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}"

    return _CONTROL_RE.sub(escape, text)


@cache
def _dicom_words() -> frozenset[str]:
    """DICOM keywords and VR codes: quoted names that are not values."""
    from pydicom.datadict import keyword_dict
    from pydicom.valuerep import VR

    return frozenset(keyword_dict) | frozenset(v.value for v in VR)


def _safe_literal(body: str) -> bool:
    """Whether a quoted text cannot be a value: no letter or digit, a UID, a DICOM word."""
    return (
        not any(c.isalnum() for c in body)
        or body == WITHHELD
        or bool(_UID_RE.match(body))
        or body in _dicom_words()
    )


def withhold_values(text: str) -> str:
    """``text`` with every quoted literal that may be an element value withheld."""

    def replace(m: re.Match[str]) -> str:
        return m[0] if _safe_literal(m["body"]) else f"'{WITHHELD}'"

    return _QUOTED_RE.sub(replace, text)


def mask_phi(text: str) -> str:
    """``text`` with values following patient attribute names replaced by ``***``."""
    return _PHI_RE.sub(lambda m: f"{m['key']}{m['sep']}***", text)


def scrub(text: str, *, withhold: bool = True) -> str:
    """One log message made safe: PHI masked, control characters escaped, values withheld.

    Escaping comes before withholding so that a quoted value with a line break
    in it is still one literal. ``withhold=False`` keeps quoted literals.
    """
    safe = printable(mask_phi(text))
    return withhold_values(safe) if withhold else safe


def _holds_data(record: logging.LogRecord) -> bool:
    """Whether a record may quote data set values (all but :data:`NO_DATA_LOGGERS`')."""
    return not record.name.startswith(NO_DATA_LOGGERS)


def scrub_traceback(text: str) -> str:
    """A traceback (or stack) made safe line by line; the line breaks are kept."""
    return "\n".join(
        # Frame lines name our own files in double quotes: those are not values.
        printable(line) if line.startswith('  File "') else scrub(line)
        for line in text.split("\n")
    )


class PHIFilter(logging.Filter):
    """Scrubs every record's message (see :func:`scrub`) before any handler formats it."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Replace the formatted message with its scrubbed text; drop duplicate library records.

        pynetdicom logs an exception it caught from a socket a second time with
        ``LOGGER.exception``; when that exception says it was already logged
        (our transport guard's), the duplicate is dropped.
        """
        if record.exc_info and getattr(record.exc_info[1], "already_logged", False):
            return False
        record.msg = scrub(record.getMessage().rstrip("\n"), withhold=_holds_data(record))
        record.args = None
        return True


class SafeFormatter(logging.Formatter):
    """A formatter whose output cannot forge a line or carry a value (see the module)."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        """The record's line with its message scrubbed (a no-op after :class:`PHIFilter`)."""
        record.message = scrub(record.message, withhold=_holds_data(record))
        return super().formatMessage(record)

    def formatException(self, ei: object) -> str:  # noqa: N802 - logging's name
        """The traceback, scrubbed and with marked continuation lines."""
        return scrub_traceback(super().formatException(ei))  # type: ignore[arg-type]

    def formatStack(self, stack_info: str) -> str:  # noqa: N802 - logging's name
        """The stack, scrubbed and with marked continuation lines."""
        return scrub_traceback(super().formatStack(stack_info))

    def format(self, record: logging.LogRecord) -> str:
        """The whole record: its line, then any traceback with every line marked."""
        first, sep, rest = super().format(record).partition("\n")
        if not sep:
            return first
        return first + "\n" + CONTINUATION + rest.replace("\n", "\n" + CONTINUATION)


def _log_thread_exception(args: threading.ExceptHookArgs) -> None:
    """Send an exception that ended a thread through logging (scrubbed), not raw to stderr."""
    if args.exc_type is SystemExit:
        return
    name = args.thread.name if args.thread is not None else "?"
    logging.getLogger("node.threads").error(
        "thread %s ended by %s",
        name,
        args.exc_type.__name__,
        exc_info=(args.exc_type, args.exc_value, args.exc_traceback),  # type: ignore[arg-type]
    )


def setup_logging(level: str = "INFO", file: Path | None = None) -> None:
    """Configure root logging once: stderr, optional file, scrubbing on every handler.

    Also routes ``warnings.warn`` (pydicom's validation warnings quote element
    values) and uncaught thread exceptions through logging, and keeps pydicom
    and pynetdicom at WARNING (their DEBUG output dumps whole data sets).
    """
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if file is not None:
        file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(file, encoding="utf-8"))
    fmt = SafeFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    for handler in handlers:
        handler.setFormatter(fmt)
        handler.addFilter(PHIFilter())
    logging.basicConfig(level=level, handlers=handlers, force=True)
    logging.captureWarnings(True)
    # Every pydicom warning is logged ('default' would show each text once, and
    # remember every hostile value's text in its registry for the process' life).
    warnings.filterwarnings("always", module="pydicom")
    threading.excepthook = _log_thread_exception
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    logging.getLogger("pydicom").setLevel(logging.WARNING)
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
