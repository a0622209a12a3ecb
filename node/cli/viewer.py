"""``sarcnode viewer``: OHIF in front of a PACS's DICOMweb, read-only (see :mod:`node.viewer`).

Registered on the main app in :mod:`node.cli.main`. Prints the viewer's
address (one per ``--study``) on stdout and serves until Ctrl-C or SIGTERM;
problems (no OHIF build, a bad PACS URL, a taken port) are one line on
stderr and exit 2. The PACS's credentials are never printed.
"""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Annotated, TextIO

import typer

from node.logs import setup_logging
from node.viewer import (
    OHIF_DIR_ENV,
    OHIF_VERSION,
    Pacs,
    ViewerError,
    ViewerServer,
    fetch_ohif,
    find_dist,
    is_loopback,
)


def _say(line: str, *, stream: TextIO | None = None) -> None:
    # Plain writes, not rich: an address must never be wrapped or styled.
    out = stream or sys.stdout
    out.write(line + "\n")
    out.flush()


PacsOption = Annotated[
    str | None,
    typer.Option(
        "--pacs",
        envvar="SARCNODE_VIEWER_PACS",
        help="The PACS's DICOMweb root, http(s)://user:password@host:port/path "
        "(credentials, port and path optional); without a path, Orthanc's /dicom-web "
        "(and /wado). Credentials are sent as basic auth and never printed; give them in "
        "$SARCNODE_VIEWER_PACS to keep them out of ps.",
        show_default=False,
    ),
]

PortOption = Annotated[
    int, typer.Option("--port", min=0, max=65535, help="Port to listen on (0: any free one).")
]

HostOption = Annotated[
    str,
    typer.Option(
        "--host",
        help="Address to listen on. The viewer has no login of its own: anyone who reaches "
        "it reads the PACS with its credentials, so keep it on loopback.",
    ),
]

StudyOption = Annotated[
    list[str] | None,
    typer.Option("--study", metavar="STUDY_UID", help="Print the address that opens it."),
]

OhifOption = Annotated[
    Path | None,
    typer.Option(
        "--ohif",
        envvar=OHIF_DIR_ENV,
        help=f"Folder of the OHIF {OHIF_VERSION} build (default: var/cache/ohif-"
        f"{OHIF_VERSION} in a checkout, else ~/.cache/sarcnode).",
        show_default=False,
    ),
]

FetchOption = Annotated[
    bool,
    typer.Option(
        "--fetch",
        help="Fetch the pinned OHIF build first if it is absent (npm pack, network); "
        "without --pacs, fetch and exit.",
    ),
]


def viewer_cmd(
    pacs: PacsOption = None,
    port: PortOption = 3000,
    host: HostOption = "127.0.0.1",
    study: StudyOption = None,
    ohif: OhifOption = None,
    fetch: FetchOption = False,
) -> None:
    """Serve the OHIF viewer in front of a PACS's DICOMweb: read-only, on one origin.

    Only GET and HEAD reach the PACS. The OHIF build is never downloaded
    while serving: without it, exit 2 saying how to get it (`make viewer`).
    """
    err = sys.stderr
    try:
        if fetch:
            dist = fetch_ohif(ohif)
            _say(f"OHIF {OHIF_VERSION} in {dist.parent}")
            if pacs is None:
                return
        if pacs is None:
            _say("viewer: --pacs URL is required (or $SARCNODE_VIEWER_PACS)", stream=err)
            raise typer.Exit(2)
        target = Pacs.parse(pacs)
        dist = find_dist(ohif)
        server = ViewerServer(dist, target, host=host, port=port).start()
    except ViewerError as exc:
        _say(f"viewer: {exc}", stream=err)
        raise typer.Exit(2) from None
    setup_logging("WARNING")
    stop = threading.Event()

    def _stop(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    try:
        _say(
            f"OHIF {OHIF_VERSION} on {server.url}/ in front of the PACS {target} "
            "(read-only: GET and HEAD only)"
        )
        if not is_loopback(host):
            _say(
                f"viewer: WARNING listening on {host}: anyone who reaches this port reads the "
                "PACS (no login here)",
                stream=err,
            )
        for uid in study or []:
            _say(f"open {server.study_url(uid)}")
        if not study:
            _say(f"open {server.url}/ (study list)")
        _say("Ctrl-C stops it")
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
