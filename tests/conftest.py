"""Shared fixtures: a real ``sarcnode serve`` on a free loopback port, a real
PostgreSQL from Debian, the CLI as a subprocess, and the shared test data."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.peers import free_port, postgres_bindir

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
SARCNODE = str(Path(sys.executable).parent / "sarcnode")


def shared_data(*parts: str) -> Path:
    """A path under ../shared/data; fail (CI) or skip if the folder is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"test data missing: {path}")
        pytest.skip(f"test data missing: {path}")
    return path


def run_cli(config: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``sarcnode ARGS --config CONFIG`` and return the finished process."""
    proc = subprocess.run(
        [SARCNODE, *args, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"sarcnode {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


def cli_json(config: Path, *args: str) -> list[dict[str, Any]]:
    """Run a list command with ``--json`` and parse its one JSON array."""
    data = json.loads(run_cli(config, *args, "--json").stdout)
    assert isinstance(data, list)
    return data


@dataclass
class NodeProcess:
    """A ``sarcnode serve`` subprocess with its config and log."""

    root: Path
    config_path: Path
    port: int
    ae_title: str
    settings: dict[str, Any]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    extra_env: dict[str, str] = field(default_factory=dict)

    def start(self, timeout: float = 30.0) -> None:
        """Start serving and wait until the heartbeat says the SCP is listening."""
        hb = self.root / "storage" / "run" / "serve.json"
        hb.unlink(missing_ok=True)
        env = {**os.environ, **self.extra_env}
        env.pop("SARCNODE_CONFIG", None)
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [SARCNODE, "serve", "--config", str(self.config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"serve exited {self.proc.returncode}:\n{self.log()}")
            if hb.exists():
                return
            time.sleep(0.1)
        raise AssertionError(f"serve did not start in {timeout}s:\n{self.log()}")

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it does not exit in 15 s."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    def kill9(self) -> None:
        """``kill -9``: no clean-up of any kind."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def storescu_cmd(
        self, *options: str, calling: str = "SCANNER1", called: str | None = None
    ) -> list[str]:
        """dcmtk storescu (by full path) addressed to this node; append the files."""
        from tests.peers import DCMTK_STORESCU, require

        exe = require(DCMTK_STORESCU, "dcmtk storescu")
        return [
            exe,
            *options,
            "-aet",
            calling,
            "-aec",
            called or self.ae_title,
            "127.0.0.1",
            str(self.port),
        ]

    def log(self) -> str:
        """Everything serve printed so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run a CLI command against this node's config."""
        return run_cli(self.config_path, *args, check=check)

    def json(self, *args: str) -> list[dict[str, Any]]:
        """Run a list command with --json against this node's config."""
        return cli_json(self.config_path, *args)


def _deep_update(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_update(base[key], value)
        else:
            base[key] = value
    return base


@pytest.fixture
def node_factory(tmp_path: Path) -> Iterator[Any]:
    """Make (not start) nodes with a config under tmp_path; all are stopped at the end."""
    made: list[NodeProcess] = []

    def make(overrides: dict[str, Any] | None = None, name: str = "node") -> NodeProcess:
        root = tmp_path / name
        root.mkdir()
        port = free_port()
        settings: dict[str, Any] = {
            # Test senders use many calling AE titles: these nodes accept any valid one
            # (the shipped default refuses AEs not on dicom.allowed_calling_aes).
            "dicom": {
                "ae_title": "SARCNODE",
                "bind": "127.0.0.1",
                "port": port,
                "accept_any_calling_ae": True,
            },
            "storage": {"root": str(root / "storage"), "min_free_mb": 50},
            "scheduler": {"series_stable_seconds": 2, "tick_seconds": 0.5},
            "logging": {"level": "INFO"},
            # No pipelines unless a test asks: studies are stored, no job starts.
            "jobs": {"pipelines_dir": str(root / "no-pipelines")},
            # Each node its own /health and /metrics port (several run at once).
            "monitoring": {"port": free_port()},
        }
        _deep_update(settings, overrides or {})
        config = root / "node.yaml"
        config.write_text(yaml.safe_dump(settings))
        node = NodeProcess(
            root=root,
            config_path=config,
            port=settings["dicom"]["port"],
            ae_title=settings["dicom"]["ae_title"],
            settings=settings,
            log_path=root / "serve.log",
        )
        made.append(node)
        return node

    yield make
    for node in made:
        node.stop()


@pytest.fixture
def node(node_factory: Any) -> NodeProcess:
    """A started node on defaults (SQLite, local folders)."""
    n: NodeProcess = node_factory()
    n.start()
    return n


# -- PostgreSQL ------------------------------------------------------------------


@dataclass
class PostgresServer:
    """A private PostgreSQL cluster on a loopback port, for this test session."""

    port: int
    user: str = "sarcnode"

    def url(self, database: str) -> str:
        """SQLAlchemy URL for ``database`` on this server."""
        return f"postgresql+psycopg://{self.user}@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        """Create a fresh, empty database and return its URL."""
        import psycopg

        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(
            f"host=127.0.0.1 port={self.port} user={self.user} dbname=postgres", autocommit=True
        ) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """Start Debian's PostgreSQL (initdb into a temp dir, pg_ctl start) for the session."""
    bindir = postgres_bindir()
    base = Path(tempfile.mkdtemp(prefix="sarcnode-pg-"))
    run_as: list[str] = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        shutil.chown(base, "postgres", "postgres")
        run_as = ["runuser", "-u", "postgres", "--"]
    data = base / "data"
    port = free_port()
    subprocess.run(
        [
            *run_as,
            str(bindir / "initdb"),
            "-D",
            str(data),
            "-A",
            "trust",
            "-U",
            "sarcnode",
            "-E",
            "UTF8",
            "--no-sync",
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    opts = f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c fsync=off"
    subprocess.run(
        [
            *run_as,
            str(bindir / "pg_ctl"),
            "-D",
            str(data),
            "-l",
            str(base / "log"),
            "-o",
            opts,
            "-w",
            "-t",
            "60",
            "start",
        ],
        check=True,
        capture_output=True,
        timeout=90,
    )
    try:
        yield PostgresServer(port)
    finally:
        subprocess.run(
            [*run_as, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
            capture_output=True,
            timeout=60,
            check=False,
        )
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty database URL: SQLite file, then PostgreSQL (both run)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'index.db'}"
    server: PostgresServer = request.getfixturevalue("postgres")
    return server.create_database()
