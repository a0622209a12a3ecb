"""Pipelines as configuration: which studies start a job, and with which series in which role.

A pipeline file (``config/pipelines/*.yaml``) has a trigger (modality, a
series selection rule, the sequence-role rules, required and optional
roles, how long to wait for a missing optional role), the stages, the model
folders and the destinations. ``signatures:`` lists the signature cards a
job scores with (each that the study's sequences allow; ``signature:``, one
card, still works); every card is checked when the file is loaded, so a
missing or broken card stops ``serve`` and ``config check`` with its path.
:func:`decide` is the one place that says whether a study starts a job;
``sarcnode pipelines test STUDY_DIR`` prints its answer (and the reason)
for a folder, and the scheduler asks it for every study whose series are
stable.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import yaml

from pipelines.io.roles import RoleRules, Rule, RuleError, load_role_rules, parse_rule

#: Every stage, in the order a job runs them; ``compare`` (the prior study) is opt-in.
STAGES = ("segment", "radiomics", "score", "compare", "encode", "deliver")
DEFAULT_STAGES = ("segment", "radiomics", "score", "encode", "deliver")
# Per-stage limits (seconds) unless a pipeline's ``timeouts_s`` says otherwise.
STAGE_TIMEOUTS_S: dict[str, float] = {
    "segment": 1800.0,
    "radiomics": 3600.0,
    "score": 120.0,
    "compare": 2400.0,  # query, move and (when not analysed yet) segment and score the prior
    "encode": 600.0,
    "deliver": 300.0,
}
PRIORITIES = ("urgent", "normal", "offpeak")


class PipelineError(ValueError):
    """A pipeline file is malformed; the message names the file and the key."""


@dataclass(frozen=True)
class PriorRule:
    """Which prior study the ``compare`` stage uses (``priors:`` in a pipeline file).

    The latest study of the same PatientID, of the pipeline's modality,
    dated before the current one and at most ``max_age_days`` earlier,
    whose series include the pipeline's required roles; asked of the
    ``sources`` named (empty: every source in the node's ``priors`` config).
    """

    max_age_days: int = 730
    sources: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.max_age_days < 1:
            raise PipelineError(f"priors.max_age_days must be >= 1, got {self.max_age_days}")


def _prior_rule(data: Any, where: str) -> PriorRule:
    if data is None:
        return PriorRule()
    if not isinstance(data, Mapping) or set(data) - {"max_age_days", "sources"}:
        raise PipelineError(f"{where}: 'priors' takes max_age_days and sources")
    try:
        return PriorRule(int(data.get("max_age_days", 730)), _list(data, "sources", where))
    except (TypeError, ValueError) as exc:
        raise PipelineError(f"{where}: priors: {exc}") from exc


@dataclass(frozen=True)
class Pipeline:
    """One pipeline definition, paths resolved against its file."""

    name: str
    path: Path
    modality: str
    series_rule: Rule | None
    roles: RoleRules
    required: tuple[str, ...]
    optional: tuple[str, ...]
    wait_for_optional_s: float
    priority: str
    stages: tuple[str, ...]
    segmentation_model: Path
    signatures: tuple[Path, ...]
    destinations: tuple[str, ...]
    description: str = ""
    timeouts_s: dict[str, float] = field(default_factory=lambda: dict(STAGE_TIMEOUTS_S))
    priors: PriorRule = field(default_factory=PriorRule)


@dataclass(frozen=True)
class SeriesInfo:
    """What the decision needs to know about one series of a study."""

    series_instance_uid: str
    attributes: Mapping[str, Any]
    instances: int
    stable: bool
    stable_at: datetime | None = None


@dataclass(frozen=True)
class Decision:
    """Would ``pipeline`` start a job for this study now, with which series, and why (not)."""

    pipeline: str
    start: bool
    reason: str
    roles: dict[str, str] = field(default_factory=dict)  # role -> series UID
    classified: dict[str, str] = field(default_factory=dict)  # series UID -> role / why left out
    retry_at: datetime | None = None


def _list(data: Mapping[str, Any], key: str, where: str) -> tuple[str, ...]:
    value = data.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise PipelineError(f"{where}: '{key}' must be a list of names")
    return tuple(value)


def load_pipeline(path: Path) -> Pipeline:
    """Read and check one pipeline file (every problem names the file and key)."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise PipelineError(f"{path}: {exc}") from exc
    where = path.name
    if not isinstance(data, Mapping):
        raise PipelineError(f"{where}: must be a mapping")
    unknown = sorted(set(data) - PIPELINE_KEYS)
    if unknown:
        raise PipelineError(f"{where}: unknown key(s) {', '.join(unknown)}")
    trigger = data.get("trigger")
    if not isinstance(trigger, Mapping):
        raise PipelineError(f"{where}: needs a 'trigger' mapping")
    base = path.parent
    roles, series_rule = _trigger_rules(trigger, base, where)
    required = _list(trigger, "required", f"{where}: trigger")
    if not required:
        raise PipelineError(f"{where}: trigger.required needs at least one role")
    known_roles = {r for r, _ in roles.roles}
    for role in (*required, *_list(trigger, "optional", f"{where}: trigger")):
        if role not in known_roles:
            raise PipelineError(
                f"{where}: role {role!r} has no rule (known: {sorted(known_roles)})"
            )
    stages = _list(data, "stages", where) or DEFAULT_STAGES
    bad = [s for s in stages if s not in STAGES]
    if bad:
        raise PipelineError(f"{where}: unknown stage(s) {', '.join(bad)} (known: {STAGES})")
    if list(stages) != sorted(stages, key=STAGES.index):
        raise PipelineError(f"{where}: stages must keep the order {', '.join(STAGES)}")
    timeouts = _timeouts(data.get("timeouts_s"), where)
    priority = str(data.get("priority", "normal"))
    if priority not in PRIORITIES:
        raise PipelineError(f"{where}: priority must be one of {PRIORITIES}")
    if "segmentation_model" not in data:
        raise PipelineError(f"{where}: needs 'segmentation_model'")
    model = _segmentation_model(base / str(data["segmentation_model"]), where)
    signatures = _signatures(data, base, where)
    return Pipeline(
        name=str(data.get("name") or path.stem),
        path=path,
        modality=str(trigger.get("modality", "MR")),
        series_rule=series_rule,
        roles=roles,
        required=required,
        optional=_list(trigger, "optional", f"{where}: trigger"),
        wait_for_optional_s=float(trigger.get("wait_for_optional_s", 0)),
        priority=priority,
        stages=stages,
        segmentation_model=model,
        signatures=signatures,
        destinations=_list(data, "destinations", where),
        description=str(data.get("description", "")),
        timeouts_s=timeouts,
        priors=_prior_rule(data.get("priors"), where),
    )


#: The keys a pipeline file may hold.
PIPELINE_KEYS = frozenset(
    {
        "name",
        "description",
        "trigger",
        "priority",
        "stages",
        "segmentation_model",
        "signature",
        "signatures",
        "destinations",
        "timeouts_s",
        "priors",
    }
)


def _trigger_rules(
    trigger: Mapping[str, Any], base: Path, where: str
) -> tuple[RoleRules, Rule | None]:
    """The trigger's role rules (a rules file or inline roles) and its optional series rule."""
    try:
        if "roles_file" in trigger:
            roles = load_role_rules((base / str(trigger["roles_file"])).resolve())
        elif "roles" in trigger:
            roles = RoleRules(
                tuple(
                    (str(e["role"]), parse_rule(e["rule"], f"{where}: trigger.roles[{i}]"))
                    for i, e in enumerate(trigger["roles"])
                )
            )
        else:
            raise PipelineError(f"{where}: trigger needs 'roles_file' or 'roles'")
        series_rule = (
            parse_rule(trigger["series"], f"{where}: trigger.series")
            if "series" in trigger
            else None
        )
    except (RuleError, KeyError, TypeError) as exc:
        raise PipelineError(f"{where}: {exc}") from exc
    return roles, series_rule


def _timeouts(given: Any, where: str) -> dict[str, float]:
    """Each stage's time limit: the defaults, overridden by the file's ``timeouts_s``."""
    timeouts: dict[str, float] = dict(STAGE_TIMEOUTS_S)
    given = given or {}
    if not isinstance(given, Mapping) or any(k not in STAGES for k in given):
        raise PipelineError(f"{where}: timeouts_s maps stage names to seconds")
    try:
        timeouts |= {str(k): float(v) for k, v in given.items()}
    except (TypeError, ValueError) as exc:
        raise PipelineError(f"{where}: timeouts_s: {exc}") from exc
    if any(v <= 0 for v in timeouts.values()):
        raise PipelineError(f"{where}: timeouts_s must be positive")
    return timeouts


def _segmentation_model(folder: Path, where: str) -> Path:
    """The model folder, refused when absent, its card malformed or a checksum wrong.

    Every weight file is hashed against its card (tens of MB: well under a
    second), so ``config check`` and ``serve`` fail here rather than the
    first job.
    """
    from pipelines.segment.card import CARD_FILE, ModelError, check_inference_card, load_card

    model = folder.resolve()
    if not (model / CARD_FILE).is_file():
        raise PipelineError(f"{where}: segmentation_model {model} has no {CARD_FILE}")
    try:
        check_inference_card(load_card(model), model / CARD_FILE)
    except ModelError as exc:
        raise PipelineError(f"{where}: segmentation_model: {exc}") from exc
    return model


def _signatures(data: Mapping[str, Any], base: Path, where: str) -> tuple[Path, ...]:
    """The card folders of ``signatures:`` (or of the older one-card ``signature:``), checked."""
    from pipelines.scoring.cards import CardError, load_signatures

    if data.get("signature") and data.get("signatures"):
        raise PipelineError(f"{where}: give 'signatures' (a list) or 'signature', not both")
    given = data.get("signatures")
    if given is None:
        given = [data["signature"]] if data.get("signature") else []
    if not isinstance(given, list) or not all(isinstance(v, str) and v for v in given):
        raise PipelineError(f"{where}: 'signatures' must be a list of card folders")
    folders = tuple((base / v).resolve() for v in given)
    try:
        load_signatures(folders)
    except CardError as exc:
        raise PipelineError(f"{where}: signature card {exc}") from exc
    return folders


def load_pipelines(folder: Path, *, required: bool = False) -> list[Pipeline]:
    """Every ``*.yaml`` under ``folder``, sorted by name; duplicate names are an error.

    With ``required`` a missing or empty folder is an error too (``config
    check``): a node without pipelines stores studies but never starts a job.
    """
    if required and not folder.is_dir():
        raise PipelineError(f"pipelines folder {folder} does not exist (jobs.pipelines_dir)")
    found = [load_pipeline(p) for p in sorted(folder.glob("*.yaml"))]
    if required and not found:
        raise PipelineError(f"pipelines folder {folder} has no *.yaml file (jobs.pipelines_dir)")
    names = [p.name for p in found]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise PipelineError(f"{folder}: pipeline name(s) used twice: {', '.join(twice)}")
    return found


def decide(
    pipeline: Pipeline, series: Sequence[SeriesInfo], *, now: datetime | None = None
) -> Decision:
    """Whether ``pipeline`` starts a job for a study made of ``series`` now, and why.

    Per role the series with the most instances is chosen. No job without
    every required role; none while a chosen series is still receiving; and
    while an optional role is missing, none until ``wait_for_optional_s``
    after the last chosen series became stable.
    """
    classified: dict[str, str] = {}
    by_role: dict[str, list[SeriesInfo]] = {}
    for info in series:
        modality = str(info.attributes.get("Modality") or "")
        if modality != pipeline.modality:
            classified[info.series_instance_uid] = f"modality {modality or '?'}"
            continue
        if pipeline.series_rule is not None and not pipeline.series_rule.matches(info.attributes):
            classified[info.series_instance_uid] = "excluded by trigger.series"
            continue
        role = pipeline.roles.classify(info.attributes)
        classified[info.series_instance_uid] = role
        by_role.setdefault(role, []).append(info)
    chosen = {
        role: max(items, key=lambda s: (s.instances, s.series_instance_uid))
        for role, items in by_role.items()
        if role in (*pipeline.required, *pipeline.optional)
    }
    roles = {role: s.series_instance_uid for role, s in chosen.items()}
    missing = [r for r in pipeline.required if r not in chosen]
    if missing:
        found = ", ".join(sorted(set(classified.values()))) or "no series"
        return Decision(
            pipeline.name,
            False,
            f"no {'/'.join(missing)} series (found: {found})",
            roles,
            classified,
        )
    receiving = [r for r, s in chosen.items() if not s.stable]
    if receiving:
        return Decision(
            pipeline.name,
            False,
            f"{', '.join(receiving)} series still receiving",
            roles,
            classified,
        )
    absent = [r for r in pipeline.optional if r not in chosen]
    if absent and pipeline.wait_for_optional_s > 0:
        stable_times = [s.stable_at for s in chosen.values() if s.stable_at is not None]
        if stable_times:
            until = max(stable_times) + timedelta(seconds=pipeline.wait_for_optional_s)
            if (now or datetime.now()) < until:
                return Decision(
                    pipeline.name,
                    False,
                    f"waiting for optional {', '.join(absent)} until {until:%H:%M:%S}",
                    roles,
                    classified,
                    retry_at=until,
                )
    used = ", ".join(
        f"{r}: {chosen[r].attributes.get('SeriesDescription') or uid}" for r, uid in roles.items()
    )
    return Decision(pipeline.name, True, f"starts with {used}", roles, classified)
