"""The base of every configuration section, and the checks sections share."""

from __future__ import annotations

import ipaddress

from pydantic import BaseModel, ConfigDict

from node.dicom.validate import validate_ae_title


class Section(BaseModel):
    """Base for config sections: unknown keys are errors, values are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def ip_address(value: str) -> str:
    """``value`` if it is an IP address (a bind address), else a ValueError saying so."""
    try:
        ipaddress.ip_address(value)
    except ValueError as exc:
        raise ValueError(f"{value!r} is not an IP address") from exc
    return value


def ae_title(value: str) -> str:
    """``value`` stripped if it is a valid AE title, else a ValueError giving the reason."""
    ok, reason = validate_ae_title(value)
    if not ok:
        raise ValueError(reason)
    return value.strip()
