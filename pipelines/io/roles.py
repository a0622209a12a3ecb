"""Sequence roles (T2FS, T1, other) from DICOM attributes, by rules kept in config.

Rules are a small tree of conditions on header attributes combined with
``all``/``any``/``not`` (see ``config/sequence_roles.yaml``). They are parsed
and validated once into frozen value objects, so a bad rule file fails when it
is loaded, naming the offending entry, not when the first study arrives. The
same conditions serve the pipelines' series selection.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

OTHER = "other"
_MATCHERS = {"regex", "contains", "equals", "min", "max", "present"}


class RuleError(ValueError):
    """A rule file or rule entry is malformed; the message names where."""


def _as_text(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "\\".join(str(v) for v in value)
    return "" if value is None else str(value)


def _as_float(value: Any) -> float | None:
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    try:
        return float(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


@dataclass(frozen=True)
class Condition:
    """One test on one attribute; see the module docstring for the matchers."""

    attribute: str
    regex: re.Pattern[str] | None = None
    contains: str | None = None
    equals: str | None = None
    min: float | None = None
    max: float | None = None
    present: bool | None = None

    def matches(self, attrs: Mapping[str, Any]) -> bool:
        """True if every matcher given holds for ``attrs[attribute]``."""
        value = attrs.get(self.attribute)
        missing = value in (None, "", [])
        if self.present is not None and self.present == missing:
            return False
        if self.regex is not None and not self.regex.search(_as_text(value)):
            return False
        if self.contains is not None:
            needle = self.contains.upper()
            items = value if isinstance(value, (list, tuple)) else [value]
            texts = [_as_text(v).upper() for v in items]
            if needle not in texts and not any(needle in t for t in texts):
                return False
        if self.equals is not None and _as_text(value).upper() != self.equals.upper():
            return False
        number = _as_float(value)
        if self.min is not None and (number is None or number < self.min):
            return False
        return not (self.max is not None and (number is None or number > self.max))


@dataclass(frozen=True)
class Combined:
    """``all`` / ``any`` of sub-rules, or ``not`` of one."""

    op: str
    parts: tuple[Rule, ...]

    def matches(self, attrs: Mapping[str, Any]) -> bool:
        """Evaluate the combination on ``attrs``."""
        if self.op == "all":
            return all(p.matches(attrs) for p in self.parts)
        if self.op == "any":
            return any(p.matches(attrs) for p in self.parts)
        return not self.parts[0].matches(attrs)


Rule = Condition | Combined


def parse_rule(data: Any, where: str) -> Rule:
    """Build a rule from its YAML form.

    Raises
    ------
    RuleError
        Unknown keys, a bad regex, a non-numeric bound, or an empty combination.
    """
    if not isinstance(data, Mapping):
        raise RuleError(f"{where}: a rule must be a mapping, not {type(data).__name__}")
    ops = [k for k in ("all", "any", "not") if k in data]
    if ops:
        if len(data) != 1:
            raise RuleError(f"{where}: '{ops[0]}' must stand alone in its mapping")
        op = ops[0]
        items = data[op]
        if op == "not":
            return Combined("not", (parse_rule(items, f"{where}.not"),))
        if not isinstance(items, Sequence) or isinstance(items, str) or not items:
            raise RuleError(f"{where}.{op}: needs a non-empty list of rules")
        return Combined(op, tuple(parse_rule(x, f"{where}.{op}[{i}]") for i, x in enumerate(items)))
    if "attribute" not in data:
        raise RuleError(f"{where}: needs 'attribute' (or all/any/not)")
    unknown = set(data) - _MATCHERS - {"attribute"}
    if unknown:
        raise RuleError(f"{where}: unknown key(s) {sorted(unknown)}")
    if not set(data) & _MATCHERS:
        raise RuleError(f"{where}: no matcher ({', '.join(sorted(_MATCHERS))})")
    kwargs: dict[str, Any] = {"attribute": str(data["attribute"])}
    if "regex" in data:
        try:
            kwargs["regex"] = re.compile(str(data["regex"]))
        except re.error as exc:
            raise RuleError(f"{where}: bad regex {data['regex']!r}: {exc}") from exc
    for key in ("contains", "equals"):
        if key in data:
            kwargs[key] = str(data[key])
    for key in ("min", "max"):
        if key in data:
            try:
                kwargs[key] = float(data[key])
            except (TypeError, ValueError) as exc:
                raise RuleError(f"{where}: {key} must be a number") from exc
    if "present" in data:
        kwargs["present"] = bool(data["present"])
    return Condition(**kwargs)


@dataclass(frozen=True)
class RoleRules:
    """Ordered (role, rule) pairs; the first match wins."""

    roles: tuple[tuple[str, Rule], ...]

    def classify(self, attrs: Mapping[str, Any]) -> str:
        """The role of a series with header ``attrs``, or ``other``."""
        for role, rule in self.roles:
            if rule.matches(attrs):
                return role
        return OTHER


def load_role_rules(path: Path) -> RoleRules:
    """Read and validate a role-rules YAML file (``config/sequence_roles.yaml``).

    Raises
    ------
    RuleError
        The file is unreadable or any entry is malformed (the entry is named).
    """
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise RuleError(f"{path}: {exc}") from exc
    if not isinstance(data, Mapping) or not isinstance(data.get("roles"), list):
        raise RuleError(f"{path}: needs a top-level 'roles' list")
    roles = []
    for i, entry in enumerate(data["roles"]):
        where = f"{path.name}: roles[{i}]"
        if not isinstance(entry, Mapping) or "role" not in entry or "rule" not in entry:
            raise RuleError(f"{where}: needs 'role' and 'rule'")
        roles.append((str(entry["role"]), parse_rule(entry["rule"], f"{where}.rule")))
    return RoleRules(tuple(roles))
