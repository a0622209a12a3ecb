"""The ``sarcnode`` command: run the node and answer the admin's questions.

This module builds the app and registers every command, in the order
``--help`` lists them. The commands live by audience: :mod:`node.cli.admin`
(serve, status, what the node received, peers, config), :mod:`node.cli.audit`,
:mod:`node.cli.deliveries`, :mod:`node.cli.jobs` (jobs, pipelines, clinical
factors) and :mod:`node.cli.research` (synthetic data, segmentation models,
signatures, analyze); what they share is in :mod:`node.cli.common`.

``--json`` follows one rule, and each command's help says which it prints:
a command that lists rows (``studies``, ``jobs``, ``audit`` ...) prints one
JSON array, even of one row or none; a command about one thing (``status``,
``jobs show``, ``audit verify``, ``config show``) prints one JSON object.
Tables print every character of a UID: on a terminal a long cell folds onto
the next line, anywhere else (a pipe, a file) each row stays on one line.

``--config`` goes before the command (``sarcnode --config node.yaml jobs``)
or after it; the one nearest the command wins. Commands that read the node's
database refuse to run when it does not exist (only ``serve`` and
``deliver`` create one), so a wrong config is an error, not an empty answer.
They read the database directly, so they work while ``serve`` runs (SQLite
in WAL mode, or PostgreSQL). Exit codes: 0 ok, 1 the answer is "no" (broken
audit chain, failed echo, node down), 2 bad usage, config or value.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from node import __version__
from node.audit.keys import AuditKeyError
from node.audit.trail import AuditBreakError
from node.cli import admin, deliveries, jobs, priors, viewer
from node.cli.audit import audit_app
from node.cli.common import err, out
from node.cli.research import analyze, segment, signature
from node.cli.research.signature_cv import signature_cv_cmd

app = typer.Typer(
    name="sarcnode",
    help="sarcnode: DICOM node for sarcoma-MRI AI. Not for clinical use with demo models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Registration order is the order ``sarcnode --help`` lists the commands in.
app.command()(admin.serve)
app.command()(admin.status)
app.command()(admin.studies)
app.command()(admin.series)
app.command()(admin.instances)
app.command()(admin.associations)
app.command("deliver")(deliveries.deliver_cmd)
app.command("echo")(admin.echo_cmd)
app.command("viewer")(viewer.viewer_cmd)
app.command("priors")(priors.priors_cmd)
app.command("train-seg")(segment.train_seg)
app.command("cv-seg")(segment.cv_seg)
app.command("seg-ensemble")(segment.seg_ensemble)
app.command("segment")(segment.segment_cmd)
app.command("eval-seg")(segment.eval_seg)
app.command("radiomics")(signature.radiomics_cmd)
app.command("fit-signature")(signature.fit_signature_cmd)
app.command("evaluate")(signature.evaluate_cmd)
app.command("card-applicability")(signature.card_applicability_cmd)
app.command("analyze")(analyze.analyze_cmd)
app.command("signature-cv")(signature_cv_cmd)
app.add_typer(audit_app, name="audit")
app.add_typer(analyze.synth_app, name="synth")
app.add_typer(admin.config_app, name="config")
app.add_typer(deliveries.deliveries_app, name="deliveries")
app.add_typer(jobs.jobs_app, name="jobs")
app.add_typer(jobs.pipelines_app, name="pipelines")
app.add_typer(jobs.clinical_app, name="clinical")


def _print_version(value: bool) -> None:
    """``--version``: print ``sarcnode X.Y.Z`` and stop before any command runs."""
    if value:
        out.print(f"sarcnode {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            "-c",
            envvar="SARCNODE_CONFIG",
            help="YAML config file for the command that follows (one given after it wins).",
        ),
    ] = None,
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """sarcnode: DICOM node for sarcoma-MRI AI. Not for clinical use with demo models.

    ``--config`` here applies to the command that follows (which may take
    its own ``--config`` too: the one after the command wins).
    """


def main() -> None:
    """Console-script entry point.

    An audit break or key problem met by any command that writes an audit
    event ends it with the reason (exit 1), not a traceback.
    """
    try:
        app()
    except (AuditBreakError, AuditKeyError) as exc:
        err.print(f"[red]audit:[/red] {escape(str(exc))}")
        sys.exit(1)


if __name__ == "__main__":
    main()
