"""Where the node looks for a patient's prior studies: query/retrieve sources.

Each source is a PACS the node may C-FIND (study, then series level) and
C-MOVE from; the moved instances come to the node's own Storage SCP
(``dicom.ae_title``), so the PACS must know that AE (Orthanc:
``DicomModalities``). Which prior counts is the pipeline's rule
(``priors:`` in its file, see :mod:`node.pipelines`); these settings say
whom to ask and how long to wait.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, field_validator

from node.config.base import Section, ae_title
from node.config.dicom import TLSSettings


class PriorSource(Section):
    """One query/retrieve peer (C-FIND and C-MOVE SCP)."""

    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]
    ae_title: str
    host: str
    port: Annotated[int, Field(ge=1, le=65535)]
    tls: TLSSettings = Field(default_factory=TLSSettings)
    timeout_s: Annotated[float, Field(gt=0)] = Field(
        30.0, description="Association, DIMSE and network timeout of one query or move."
    )

    @field_validator("ae_title")
    @classmethod
    def _ae_title(cls, value: str) -> str:
        return ae_title(value)


class PriorSettings(Section):
    """Query/retrieve sources and the limits of one prior's retrieval."""

    sources: list[PriorSource] = Field(default_factory=list)
    move_timeout_s: Annotated[float, Field(gt=0)] = Field(
        900.0, description="How long a job waits for a moved prior's series to arrive and settle."
    )
    down_backoff_s: Annotated[float, Field(ge=0)] = Field(
        300.0,
        description="After a source refused or did not answer, jobs do not ask it again this long.",
    )
