"""The node's one UID root and the deterministic UIDs of everything it writes.

Every object the node makes gets UIDs derived from what it was made from
(source series, model version, job key, object kind), so a re-run of the same
job writes the same UIDs and the PACS replaces (or keeps) one copy instead of
collecting duplicates. Sites with their own registered root set
``uids.root`` in the node configuration; without one, UIDs live under the
UUID-derived root ``2.25`` (ISO/IEC 9834-8), which needs no registration.
"""

from __future__ import annotations

import hashlib
import re
import uuid

from pydicom.uid import UID, generate_uid

DEFAULT_ROOT: str | None = None  # None = 2.25.<integer of a hash>, see module docstring
_ROOT = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*\.$")


def check_root(root: str | None) -> str | None:
    """``root`` if it is a valid prefix (digits and dots, ending with a dot, ≤ 40 chars)."""
    if root is None:
        return None
    if not _ROOT.match(root) or len(root) > 40:
        raise ValueError(
            f"UID root {root!r} must be dotted digits without leading zeros, end with '.', "
            "and leave room for a suffix (at most 40 characters)"
        )
    return root


def derived_uid(*parts: object, root: str | None = DEFAULT_ROOT) -> UID:
    """A UID determined by ``parts``: the same parts always give the same UID.

    Under ``2.25`` the suffix is a name-based UUID (SHA-256 of the parts,
    version bits set as for UUID version 5); under a site root, pydicom's
    hash-based suffix. (pydicom's ``generate_uid(prefix=None)`` ignores its
    entropy sources and is random, so it is not used for 2.25.)
    """
    text = ["sarcnode", *map(str, parts)]
    root = check_root(root)
    if root is None:
        digest = hashlib.sha256("\x1f".join(text).encode()).digest()[:16]
        return UID(f"2.25.{uuid.UUID(bytes=digest, version=5).int}")
    return UID(generate_uid(prefix=root, entropy_srcs=text))
