"""The audit trail's HMAC keys: kept outside the database, readable only by the node.

Chain entries are keyed with HMAC-SHA256, so a database writer who does not
hold the key can neither re-hash an edited event nor forge a new one. Keys come
from one of two places, first match wins:

1. the environment variable ``SARCNODE_AUDIT_KEY`` (for containers and secret
   stores): one or more keys separated by commas or white space;
2. a key file (``audit.key_file``, default ``<storage.root>/audit/audit.key``):
   one key per line, ``#`` comments allowed. It must be a regular file that
   neither group nor others can read or write (mode 0600 or 0400); otherwise it
   is refused, as ``ssh`` refuses a private key others can read.

A key is at least 32 random bytes written as hex. In both places the **last**
key signs new events and every earlier one is kept only to verify the events it
signed (key rotation: append a new key, never delete an old one while events
signed by it are kept). A key is named by its *key id*, a fingerprint derived
from the key, which every event records beside its hash.

When neither is configured, the first process that writes an audit event
creates the key file with mode 0600 and logs its path and key id (never the
key).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

#: Environment variable holding the keys (overrides the key file when set).
ENV_KEY = "SARCNODE_AUDIT_KEY"
#: Shortest key accepted, in bytes (HMAC-SHA256's block of security).
MIN_KEY_BYTES = 32
#: Length of a key id in hex digits (what ``audit_events.key_id`` holds).
KEY_ID_LEN = 16

_HEX = re.compile(r"^[0-9a-fA-F]+$")
_FILE_HEADER = (
    "# sarcnode audit trail HMAC keys: one key (hex, >= 32 bytes) per line.\n"
    "# The LAST line signs new events; keep earlier lines to verify old events.\n"
    "# Keep this file mode 0600, readable only by the node, and back it up apart\n"
    "# from the database: without it the audit trail cannot be verified.\n"
)


class AuditKeyError(Exception):
    """No usable audit key: missing, malformed, or in a file others can read."""


@dataclass(frozen=True, repr=False)
class AuditKey:
    """One HMAC-SHA256 key; its ``repr`` shows the key id, never the secret."""

    secret: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if len(self.secret) < MIN_KEY_BYTES:
            raise AuditKeyError(
                f"audit key too short: {len(self.secret)} bytes, at least {MIN_KEY_BYTES} needed"
            )

    @property
    def key_id(self) -> str:
        """Fingerprint naming this key in events and the anchor (reveals nothing of it)."""
        digest = hashlib.sha256(b"sarcnode audit key id\x00" + self.secret).hexdigest()
        return digest[:KEY_ID_LEN]

    def mac(self, data: bytes) -> str:
        """HMAC-SHA256 of ``data`` as 64 hex digits."""
        return hmac.new(self.secret, data, hashlib.sha256).hexdigest()

    def __repr__(self) -> str:
        return f"AuditKey(key_id={self.key_id!r})"


@dataclass(frozen=True)
class Keyring:
    """The keys a process knows: the last signs, all of them verify.

    Attributes
    ----------
    keys
        Oldest first; never empty.
    source
        Where they came from, for messages (``$SARCNODE_AUDIT_KEY`` or the file).
    created
        True when this process has just created the key file.
    """

    keys: tuple[AuditKey, ...]
    source: str
    created: bool = False

    def __post_init__(self) -> None:
        if not self.keys:
            raise AuditKeyError(f"no audit key in {self.source}")

    @property
    def current(self) -> AuditKey:
        """The key that signs new events (the last one given)."""
        return self.keys[-1]

    def get(self, key_id: str) -> AuditKey | None:
        """The key named ``key_id``, or None when this keyring does not hold it."""
        for key in self.keys:
            if key.key_id == key_id:
                return key
        return None

    @property
    def key_ids(self) -> list[str]:
        """Every key id, oldest first."""
        return [k.key_id for k in self.keys]


def parse_keys(text: str, source: str) -> tuple[AuditKey, ...]:
    """Keys from a file's or variable's text: hex, separated by lines, commas or spaces.

    Raises
    ------
    AuditKeyError
        A key is not hex or shorter than :data:`MIN_KEY_BYTES`; the value of
        the bad key is not repeated in the message.
    """
    keys: list[AuditKey] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        line = line.split("#", 1)[0]
        for token in line.replace(",", " ").split():
            if not _HEX.match(token) or len(token) % 2:
                raise AuditKeyError(f"{source}, line {lineno}: a key must be hex digits")
            try:
                key = AuditKey(bytes.fromhex(token))
            except AuditKeyError as exc:
                raise AuditKeyError(f"{source}, line {lineno}: {exc}") from exc
            if key not in keys:
                keys.append(key)
    return tuple(keys)


def check_key_file(path: Path) -> None:
    """Refuse a key file that is not a regular file or that group/others may read or write.

    Raises
    ------
    AuditKeyError
        With the file's mode and the ``chmod`` that fixes it.
    """
    try:
        st = path.stat()
    except OSError as exc:
        raise AuditKeyError(f"audit key file {path}: {exc.strerror}") from exc
    if not stat.S_ISREG(st.st_mode):
        raise AuditKeyError(f"audit key file {path} is not a regular file")
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        raise AuditKeyError(
            f"audit key file {path} has mode {mode:04o}: group or others may read or "
            f"write it; run `chmod 600 {path}` (and check who could have copied it)"
        )


def read_key_file(path: Path) -> Keyring:
    """The keyring in ``path``, after :func:`check_key_file`."""
    check_key_file(path)
    try:
        text = path.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        raise AuditKeyError(f"cannot read audit key file {path}: {exc}") from exc
    return Keyring(parse_keys(text, f"audit key file {path}"), f"key file {path}")


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_private(path: Path, text: str, *, exclusive: bool) -> None:
    """Write ``text`` to ``path`` with mode 0600 (temp file + rename unless ``exclusive``)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    target = path if exclusive else path.with_name(f".{path.name}.{os.getpid()}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | (os.O_EXCL if exclusive else os.O_TRUNC)
    fd = os.open(target, flags, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, text.encode("ascii"))
        os.fsync(fd)
    finally:
        os.close(fd)
    if not exclusive:
        target.replace(path)
    _fsync_dir(path.parent)


def create_key_file(path: Path) -> Keyring:
    """Create ``path`` (mode 0600, folder 0700) holding one new random key.

    If another process created it first, that file is read instead.
    """
    key = AuditKey(secrets.token_bytes(MIN_KEY_BYTES))
    try:
        _write_private(path, _FILE_HEADER + key.secret.hex() + "\n", exclusive=True)
    except FileExistsError:
        return read_key_file(path)
    except OSError as exc:
        raise AuditKeyError(f"cannot create audit key file {path}: {exc.strerror}") from exc
    log.warning(
        "created audit key file %s (key id %s, mode 0600): back it up apart from the "
        "database; without it the audit trail cannot be verified",
        path,
        key.key_id,
    )
    return Keyring((key,), f"key file {path}", created=True)


def load_keyring(
    key_file: Path, *, create: bool, environ: Mapping[str, str] | None = None
) -> Keyring:
    """The keys from ``$SARCNODE_AUDIT_KEY``, else ``key_file``, else a new key file.

    Parameters
    ----------
    key_file
        The configured (or default) key file.
    create
        Create ``key_file`` when neither source exists. Job workers pass False:
        only the node and the admin CLI create keys.
    environ
        The environment to read (default ``os.environ``).

    Raises
    ------
    AuditKeyError
        No key and ``create`` is False; a malformed key; a key file others
        can read; a file that cannot be created.
    """
    env = os.environ if environ is None else environ
    value = env.get(ENV_KEY, "").strip()
    if value:
        return Keyring(parse_keys(value, f"${ENV_KEY}"), f"${ENV_KEY}")
    if key_file.exists():
        return read_key_file(key_file)
    if not create:
        raise AuditKeyError(f"no audit key: set ${ENV_KEY} or provide the key file {key_file}")
    return create_key_file(key_file)


def add_key(path: Path) -> AuditKey:
    """Rotate: append a new random key to the key file ``path`` and return it.

    The new key signs every event written from now on (by processes started
    after this); the old keys stay in the file to verify what they signed.
    """
    keyring = read_key_file(path)
    key = AuditKey(secrets.token_bytes(MIN_KEY_BYTES))
    text = path.read_text(encoding="ascii")
    if not text.endswith("\n"):
        text += "\n"
    _write_private(path, text + key.secret.hex() + "\n", exclusive=False)
    log.info(
        "audit key rotated in %s: new key id %s signs from now on (old: %s)",
        path,
        key.key_id,
        ", ".join(keyring.key_ids),
    )
    return key
