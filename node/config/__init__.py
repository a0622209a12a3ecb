"""Typed node settings: one YAML file, environment overrides, validated once.

The node reads its configuration in ``main()`` (never at import time) and
passes the resulting :class:`Settings` down. Precedence, highest first:

1. environment variables ``SARCNODE_<SECTION>__<KEY>`` (e.g.
   ``SARCNODE_DICOM__PORT=11113``), so a container or systemd unit can change
   one value without editing the file;
2. the YAML file named by ``--config`` or ``SARCNODE_CONFIG``;
3. the embedded defaults below (SQLite and folders under ``./var/sarcnode``).

Unknown keys are errors, so a typo in the file is reported instead of being
silently ignored. Relative paths are taken relative to the working directory
the node is started in, as Orthanc does.
"""

from __future__ import annotations

import ipaddress
import os
from datetime import datetime
from datetime import time as dtime
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from node.config.base import Section, ip_address
from node.config.dicom import (
    DEFAULT_STORAGE_CLASSES,
    DEFAULT_TRANSFER_SYNTAXES,
    MAX_PDU_SIZE,
    MIN_PDU_SIZE,
    DicomSettings,
    TLSSettings,
)
from node.config.priors import PriorSettings, PriorSource
from pipelines.share import config_dir

__all__ = [
    "CONFIG_ENV",
    "DEFAULT_STORAGE_CLASSES",
    "DEFAULT_TRANSFER_SYNTAXES",
    "ENV_PREFIX",
    "MAX_PDU_SIZE",
    "MIN_PDU_SIZE",
    "AuditSettings",
    "ConfigError",
    "DatabaseSettings",
    "DeliverySettings",
    "DestinationAuth",
    "DestinationSettings",
    "DicomSettings",
    "ExecutorSettings",
    "JobSettings",
    "LoggingSettings",
    "MonitoringSettings",
    "PriorSettings",
    "PriorSource",
    "SchedulerSettings",
    "Settings",
    "StorageSettings",
    "TLSSettings",
    "UidSettings",
    "load_settings",
    "resolve_config_path",
    "security_warnings",
]

ENV_PREFIX = "SARCNODE_"
CONFIG_ENV = "SARCNODE_CONFIG"


class StorageSettings(Section):
    """Where received instances live, how much disk must stay free, what one may cost."""

    root: Path = Path("var/sarcnode")
    min_free_mb: Annotated[int, Field(ge=0)] = 1024
    fsync: bool = Field(True, description="fsync each file and its folder before answering.")
    max_dataset_mb: Annotated[int, Field(ge=1, le=65536)] = Field(
        512, description="Largest data set accepted, as received and (deflated) as inflated."
    )
    max_inflate_ratio: Annotated[float, Field(ge=1)] = Field(
        100.0, description="Refuse a deflated data set that inflates more than this many times."
    )
    duplicate_conflict: Literal["warn", "refuse"] = Field(
        "warn",
        description="A re-sent SOP Instance UID with other content: keep the first and answer "
        "a warning (0xB006), or refuse it (0x0111). Audited with both hashes either way.",
    )


class DatabaseSettings(Section):
    """The index and audit database. ``None``: SQLite under the storage root."""

    url: str | None = None
    echo: bool = False

    @field_validator("url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError

        try:
            url = make_url(value)
        except ArgumentError as exc:
            raise ValueError(f"not a database URL: {exc}") from exc
        if url.get_backend_name() not in {"sqlite", "postgresql"}:
            raise ValueError(f"backend {url.get_backend_name()!r}: use sqlite or postgresql")
        return value


class SchedulerSettings(Section):
    """Timing of the background tick that watches series for stability."""

    series_stable_seconds: Annotated[float, Field(gt=0)] = 30.0
    tick_seconds: Annotated[float, Field(gt=0)] = 2.0


class DestinationAuth(Section):
    """STOW-RS credentials. Secrets come from environment variables, never the file."""

    kind: Literal["none", "basic", "bearer"] = "none"
    username: str | None = None
    password_env: str | None = Field(None, description="Environment variable with the password.")
    token_env: str | None = Field(None, description="Environment variable with the bearer token.")

    @model_validator(mode="after")
    def _complete(self) -> DestinationAuth:
        if self.kind == "basic" and not (self.username and self.password_env):
            raise ValueError("basic auth needs username and password_env")
        if self.kind == "bearer" and not self.token_env:
            raise ValueError("bearer auth needs token_env")
        return self


class DestinationSettings(Section):
    """Where results go: a DICOM peer (C-STORE), a DICOMweb server (STOW-RS) or a folder."""

    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]
    kind: Literal["dicom", "stow", "folder"]
    # dicom
    ae_title: str | None = None
    host: str | None = None
    port: Annotated[int, Field(ge=1, le=65535)] | None = None
    tls: TLSSettings = Field(default_factory=TLSSettings)
    storage_commitment: bool = False
    # stow
    url: str | None = None
    auth: DestinationAuth = Field(default_factory=DestinationAuth)
    ca: Path | None = Field(None, description="CA bundle for an https URL.")
    # folder
    path: Path | None = None
    timeout_s: Annotated[float, Field(gt=0)] = 30.0

    @model_validator(mode="after")
    def _fields_for_kind(self) -> DestinationSettings:
        needed = {"dicom": ("ae_title", "host", "port"), "stow": ("url",), "folder": ("path",)}
        missing = [n for n in needed[self.kind] if getattr(self, n) is None]
        if missing:
            raise ValueError(f"destination {self.name!r} ({self.kind}) needs {', '.join(missing)}")
        if self.kind == "dicom":
            assert self.ae_title is not None
            if not 1 <= len(self.ae_title.strip()) <= 16 or "\\" in self.ae_title:
                raise ValueError(f"destination {self.name!r}: AE title must be 1-16 characters")
        if self.kind == "stow" and not str(self.url).startswith(("http://", "https://")):
            raise ValueError(f"destination {self.name!r}: url must be http(s)://...")
        if self.storage_commitment and self.kind != "dicom":
            raise ValueError(f"destination {self.name!r}: storage commitment is DICOM only")
        return self


class DeliverySettings(Section):
    """Retry policy of the delivery outbox."""

    max_attempts: Annotated[int, Field(ge=1, le=100)] = 8
    backoff_base_s: Annotated[float, Field(gt=0)] = 30.0
    backoff_max_s: Annotated[float, Field(gt=0)] = 3600.0
    jitter: Annotated[float, Field(ge=0, le=1)] = 0.2
    commitment_timeout_s: Annotated[float, Field(gt=0)] = Field(
        300.0, description="Wait this long for a storage commitment report, then resend."
    )


class ExecutorSettings(Section):
    """Where job stages run: a local process pool, or a Ray cluster."""

    kind: Literal["local", "ray"] = "local"
    address: str | None = Field(
        None, description="Ray cluster address (ray://host:10001 or auto); none = start locally."
    )
    num_cpus: Annotated[int, Field(ge=1)] | None = Field(
        None, description="CPUs of a locally started Ray instance."
    )


class JobSettings(Section):
    """How jobs run: parallelism, retries, device, the off-peak window, pipeline files."""

    pipelines_dir: Path = Field(
        default_factory=lambda: config_dir() / "pipelines",  # found when settings are made
        description="Folder of pipeline YAML files.",
    )
    max_parallel: Annotated[int, Field(ge=1, le=64)] = 1
    max_attempts: Annotated[int, Field(ge=1, le=20)] = 3
    retry_base_s: Annotated[float, Field(ge=0)] = 30.0
    retry_max_s: Annotated[float, Field(gt=0)] = Field(
        3600.0, description="The retry back-off's cap (seconds)."
    )
    retry_jitter: Annotated[float, Field(ge=0, le=1)] = Field(
        0.2, description="The back-off spread, a fraction (+/-) of the delay."
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    offpeak: str = Field("20:00-06:00", pattern=r"^\d{2}:\d{2}-\d{2}:\d{2}$")
    executor: ExecutorSettings = Field(default_factory=ExecutorSettings)

    def in_offpeak(self, now: datetime) -> bool:
        """Whether ``now`` (UTC, naive) falls in the off-peak window (may wrap midnight)."""
        start, end = (dtime.fromisoformat(t) for t in self.offpeak.split("-"))
        t = now.time()
        return start <= t < end if start < end else (t >= start or t < end)


class UidSettings(Section):
    """The node's UID root for everything it writes (None: UUID-derived 2.25)."""

    root: str | None = None

    @field_validator("root")
    @classmethod
    def _root(cls, value: str | None) -> str | None:
        from pipelines.encode.uids import check_root

        return check_root(value)


class MonitoringSettings(Section):
    """The HTTP endpoint with ``/health`` and ``/metrics`` (Prometheus), see :mod:`node.health`."""

    enabled: bool = True
    bind: str = Field(
        "127.0.0.1", description="Address of the endpoint; loopback: it has no authentication."
    )
    port: Annotated[int, Field(ge=1, le=65535)] = 9180
    echo_interval_s: Annotated[float, Field(ge=0)] = Field(
        30.0, description="Reuse the health check's C-ECHO verdict this long (0: every request)."
    )
    tick_stale_s: Annotated[float, Field(gt=0)] = Field(
        60.0, description="Unhealthy when the scheduler has not ticked for this long."
    )
    outbox_stuck_s: Annotated[float, Field(gt=0)] = Field(
        3600.0, description="Unhealthy when a pending delivery has been due for this long."
    )

    @field_validator("bind")
    @classmethod
    def _bind(cls, value: str) -> str:
        return ip_address(value)


class LoggingSettings(Section):
    """Log level and optional file (stderr always)."""

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    file: Path | None = None


class AuditSettings(Section):
    """The audit trail's HMAC key and head anchor, both kept outside the database.

    The key itself never goes in this file: ``$SARCNODE_AUDIT_KEY`` or the key
    file (mode 0600). See :mod:`node.audit.keys` and :mod:`node.audit.anchor`.
    """

    key_file: Path | None = Field(
        None,
        description="HMAC key file, mode 0600; none: <storage.root>/audit/audit.key, created "
        "on first use. $SARCNODE_AUDIT_KEY, when set, is used instead.",
    )
    anchor_file: Path | None = Field(
        None, description="Chain head anchor; none: <storage.root>/audit/head.json."
    )
    head_log_minutes: Annotated[float, Field(ge=0)] = Field(
        60.0, description="Log the chain head (seq and hash) this often; 0: at start and stop."
    )


class Settings(BaseSettings):
    """The whole node configuration, validated at once."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    dicom: DicomSettings = Field(default_factory=DicomSettings)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    scheduler: SchedulerSettings = Field(default_factory=SchedulerSettings)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)
    monitoring: MonitoringSettings = Field(default_factory=MonitoringSettings)
    destinations: list[DestinationSettings] = Field(default_factory=list)
    delivery: DeliverySettings = Field(default_factory=DeliverySettings)
    uids: UidSettings = Field(default_factory=UidSettings)
    jobs: JobSettings = Field(default_factory=JobSettings)
    audit: AuditSettings = Field(default_factory=AuditSettings)
    priors: PriorSettings = Field(default_factory=PriorSettings)

    @field_validator("destinations")
    @classmethod
    def _unique_names(cls, values: list[DestinationSettings]) -> list[DestinationSettings]:
        names = [d.name for d in values]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"destination name(s) used twice: {', '.join(twice)}")
        return values

    def destination(self, name: str) -> DestinationSettings:
        """The destination called ``name`` (KeyError naming the known ones otherwise)."""
        for d in self.destinations:
            if d.name == name:
                return d
        known = ", ".join(d.name for d in self.destinations) or "none configured"
        raise KeyError(f"no destination {name!r} ({known})")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Environment beats the file; the file (passed as init kwargs) beats defaults."""
        return (env_settings, init_settings)

    @property
    def database_url(self) -> str:
        """The effective database URL (SQLite under the storage root by default)."""
        if self.database.url:
            return self.database.url
        return f"sqlite:///{(self.storage.root / 'sarcnode.db').resolve()}"


def _is_loopback(address: str) -> bool:
    return ipaddress.ip_address(address).is_loopback


def security_warnings(settings: Settings) -> list[str]:
    """What in ``settings`` leaves the node open or unusable, one sentence each.

    ``config check`` prints these loudly and ``serve`` logs them at start; none
    of them stops the node (a lab may mean it), but each names the key to set.
    """
    d = settings.dicom
    warnings: list[str] = []
    exposed = not _is_loopback(d.bind)
    if exposed and not d.allowed_peers and not d.tls.enabled:
        warnings.append(
            f"dicom.bind {d.bind} is reachable from the network with neither dicom.allowed_peers "
            "nor dicom.tls: any host that reaches the port can send objects, and calling AE "
            "titles are not authentication. Set allowed_peers to your senders' addresses or "
            "enable TLS with client certificates."
        )
    if d.accept_any_calling_ae and exposed:
        warnings.append(
            f"dicom.accept_any_calling_ae is true on {d.bind}: every calling AE title is "
            "accepted. List your senders in dicom.allowed_calling_aes instead."
        )
    if not d.accept_any_calling_ae and not d.allowed_calling_aes:
        warnings.append(
            "dicom.allowed_calling_aes is empty: every association will be refused. List the "
            "AE titles of the scanners and PACS that send to this node."
        )
    if d.max_connections_per_ip >= d.max_associations:
        warnings.append(
            f"dicom.max_connections_per_ip ({d.max_connections_per_ip}) is not below "
            f"dicom.max_associations ({d.max_associations}): one address can hold every slot."
        )
    if d.max_associations_per_peer >= d.max_associations:
        warnings.append(
            f"dicom.max_associations_per_peer ({d.max_associations_per_peer}) is not below "
            f"dicom.max_associations ({d.max_associations}): one sender can hold every slot."
        )
    if not d.accept_any_calling_ae:
        for dest in settings.destinations:
            if dest.storage_commitment and dest.ae_title not in d.allowed_calling_aes:
                warnings.append(
                    f"destination {dest.name} uses storage commitment but its AE title "
                    f"{dest.ae_title} is not in dicom.allowed_calling_aes: its commitment "
                    "reports will be refused."
                )
    return warnings


class ConfigError(Exception):
    """The configuration cannot be used; ``problems`` names every bad field."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        super().__init__(f"{source}: " + "; ".join(problems))


def _format_errors(exc: ValidationError) -> list[str]:
    problems = []
    for error in exc.errors():
        where = ".".join(str(p) for p in error["loc"]) or "(top level)"
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = "unknown key"
        problems.append(f"{where}: {message}")
    return problems


def resolve_config_path(path: Path | None) -> Path | None:
    """The file to read: ``--config``, else ``$SARCNODE_CONFIG``, else none (defaults)."""
    if path is not None:
        return path
    env = os.environ.get(CONFIG_ENV)
    return Path(env) if env else None


def load_settings(path: Path | None = None) -> Settings:
    """Read and validate the node configuration.

    Parameters
    ----------
    path
        YAML file; ``None`` means ``$SARCNODE_CONFIG`` or the embedded defaults.

    Raises
    ------
    ConfigError
        The file is missing or not YAML, or one or more fields are invalid
        (every bad field is listed, by its dotted name).
    """
    path = resolve_config_path(path)
    source = str(path) if path else "embedded defaults"
    data: dict[str, Any] = {}
    if path is not None:
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(source, [f"cannot read config file: {exc.strerror}"]) from exc
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(source, [f"not valid YAML: {exc}"]) from exc
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(source, ["top level must be a mapping of sections"])
        data = loaded
    try:
        return Settings(**data)
    except ValidationError as exc:
        raise ConfigError(source, _format_errors(exc)) from exc
