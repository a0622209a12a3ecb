"""A study's clinical factors: the nomogram's inputs, typed and checked once.

The CLI's ``analyze`` and ``clinical set`` options, the node's stored
factors (``<storage>/clinical/<study>.json``) and the cohort tables the
cards are fitted on all pass through here, so ``--sex male`` means male
everywhere and a value nobody can read is refused with its name instead
of becoming a silent zero.

The stored and scored form is the cards' covariates (0/1 and years):
``edema``, ``metastasis``, ``grade3``, ``age``, ``sex_male``.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

#: Words read as yes / no for a 0/1 factor (the CLI's ``--edema yes``).
YES = ("yes", "y", "true", "1")
NO = ("no", "n", "false", "0")


class Sex(enum.Enum):
    """Sex as the cards' ``sex_male`` covariate reads it."""

    MALE = "M"
    FEMALE = "F"

    @classmethod
    def parse(cls, value: str | Sex) -> Sex:
        """``M``/``F``/``male``/``female`` in any case, or a member.

        Raises
        ------
        ValueError
            Naming the value and what is accepted.
        """
        if isinstance(value, Sex):
            return value
        text = str(value).strip().lower()
        if text in ("m", "male"):
            return cls.MALE
        if text in ("f", "female"):
            return cls.FEMALE
        raise ValueError(f"sex {value!r}: expected M or F (male or female)")


def male(value: object) -> float:
    """A cohort table's sex as the ``sex_male`` column: 1.0, 0.0, NaN when not recorded.

    Raises
    ------
    ValueError
        For a value that is neither sex (:meth:`Sex.parse`).
    """
    if value is None or (isinstance(value, float) and value != value):  # None or NaN
        return float("nan")
    return float(Sex.parse(str(value)) is Sex.MALE)


def yes_no(name: str, value: str | bool | int | None) -> bool | None:
    """A yes/no factor from a word, a bool or 0/1; None stays None.

    Raises
    ------
    ValueError
        ``<name> '<value>': expected yes or no``.
    """
    if value is None or isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in YES:
        return True
    if text in NO:
        return False
    raise ValueError(f"{name} {value!r}: expected yes or no")


@dataclass(frozen=True)
class ClinicalFactors:
    """The factors given for one study; None where a factor is not known.

    ``grade3`` is "histological grade 3" (the demo nomogram's covariate), so
    grade 1 and 2 are both False.
    """

    edema: bool | None = None
    metastasis: bool | None = None
    grade3: bool | None = None
    age: int | None = None
    sex: Sex | None = None

    def __post_init__(self) -> None:
        for name in ("edema", "metastasis", "grade3"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, bool):
                raise ValueError(f"clinical factor {name} {value!r}: expected yes or no")
        if self.age is not None and (
            isinstance(self.age, bool) or not isinstance(self.age, int) or not 0 <= self.age <= 120
        ):
            raise ValueError(f"clinical factor age {self.age!r}: expected whole years 0 to 120")
        if self.sex is not None and not isinstance(self.sex, Sex):
            raise ValueError(f"clinical factor sex {self.sex!r}: expected M or F")

    @classmethod
    def from_options(
        cls,
        *,
        edema: str | None = None,
        metastasis: str | None = None,
        grade: int | None = None,
        age: int | None = None,
        sex: str | Sex | None = None,
    ) -> ClinicalFactors:
        """From the CLI's words: ``--edema yes``, ``--grade 3``, ``--sex M`` (or ``male``).

        Raises
        ------
        ValueError
            Naming the option and the value it could not read.
        """
        if grade is not None and grade not in (1, 2, 3):
            raise ValueError(f"grade {grade!r}: expected 1, 2 or 3")
        return cls(
            edema=yes_no("edema", edema),
            metastasis=yes_no("metastasis", metastasis),
            grade3=None if grade is None else grade == 3,
            age=age,
            sex=None if sex is None else Sex.parse(sex),
        )

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ClinicalFactors:
        """From the stored covariates (:meth:`to_json`); an unknown key is an error.

        Raises
        ------
        ValueError
            Naming the key or value that is not a clinical factor.
        """
        known = {"edema", "metastasis", "grade3", "age", "sex_male"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"not clinical factors: {', '.join(unknown)} (known: {sorted(known)})")

        def flag(name: str) -> bool | None:
            value = data.get(name)
            return None if value is None else yes_no(name, value)

        male = flag("sex_male")
        age = data.get("age")
        if age is not None and isinstance(age, float) and age.is_integer():
            age = int(age)
        return cls(
            edema=flag("edema"),
            metastasis=flag("metastasis"),
            grade3=flag("grade3"),
            age=age,
            sex=None if male is None else (Sex.MALE if male else Sex.FEMALE),
        )

    def to_json(self) -> dict[str, int]:
        """The known factors as the cards' covariates (0/1, years), unknown ones left out."""
        out: dict[str, int] = {}
        for name in ("edema", "metastasis", "grade3"):
            value = getattr(self, name)
            if value is not None:
                out[name] = int(value)
        if self.age is not None:
            out["age"] = self.age
        if self.sex is not None:
            out["sex_male"] = int(self.sex is Sex.MALE)
        return out

    def covariates(self) -> dict[str, float]:
        """What :func:`pipelines.scoring.score` reads: covariate name -> value."""
        return {k: float(v) for k, v in self.to_json().items()}

    def updated(self, newer: ClinicalFactors) -> ClinicalFactors:
        """These factors with every factor ``newer`` knows replaced by its value."""
        given = {f.name: getattr(newer, f.name) for f in fields(newer)}
        return replace(self, **{k: v for k, v in given.items() if v is not None})

    def words(self) -> str:
        """``age 60, edema yes, grade3 yes, metastasis no, sex_male yes``: what a person reads."""
        return ", ".join(
            f"{k} {v}" if k == "age" else f"{k} {'yes' if v else 'no'}"
            for k, v in sorted(self.to_json().items())
        )

    def __bool__(self) -> bool:
        """True when at least one factor is known."""
        return bool(self.to_json())
