"""Where the shipped data lives: ``config/`` and ``models/``, in a checkout or an install.

In a checkout (and an editable install) they are the repository's own
``config/`` and ``models/`` folders. A wheel carries them as the data-only
package ``sarcnode_data`` (``setup.py`` copies them in), laid out the same
way, so relative paths inside pipeline files (``../../models/<id>``) hold in
both. Every default path to a pipeline, sequence-role rule file, radiomics
parameter file or model folder is built from :func:`share_root`.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

#: The data-only package a wheel installs beside ``node`` and ``pipelines``.
PACKAGE = "sarcnode_data"


@cache
def share_root() -> Path:
    """The folder holding ``config/`` and ``models/``.

    The checkout's root when this module runs from one; else the installed
    ``sarcnode_data`` folder next to the ``pipelines`` package.
    """
    base = Path(__file__).resolve().parents[1]
    installed = base / PACKAGE
    if (installed / "config").is_dir():
        return installed
    return base


def config_dir() -> Path:
    """The shipped ``config/`` folder (pipelines, sequence roles, radiomics parameters)."""
    return share_root() / "config"


def models_dir() -> Path:
    """The shipped ``models/`` folder (one sub-folder per model card)."""
    return share_root() / "models"
