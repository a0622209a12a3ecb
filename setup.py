"""Build hook: the wheel carries ``config/`` and ``models/`` as package data.

Metadata lives in ``pyproject.toml``; this file only adds the data-only
package ``sarcnode_data`` (see ``pipelines/share.py``): the pipeline files,
sequence-role rules and radiomics parameter files under ``config/``, and the
shipped model folders (weights, cards, CV figures) under ``models/``, copied
into the build as they are laid out in the checkout, so that an installed node
runs jobs exactly as a checkout does. Editable installs read the checkout.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
DATA = ("config", "models")
SKIP = shutil.ignore_patterns("__pycache__", "*.py", "*.pyc")


class BuildWithData(build_py):
    """``build_py`` that also copies ``config/`` and ``models/`` into ``sarcnode_data/``."""

    def run(self) -> None:
        """Build the Python packages, then add the data folders (not for editable installs)."""
        super().run()
        if getattr(self, "editable_mode", False):
            return
        target = Path(self.build_lib) / "sarcnode_data"
        for name in DATA:
            shutil.rmtree(target / name, ignore_errors=True)
            shutil.copytree(ROOT / name, target / name, ignore=SKIP)
        (target / "__init__.py").write_text('"""Shipped config/ and models/ of sarcnode."""\n')


setup(cmdclass={"build_py": BuildWithData})
