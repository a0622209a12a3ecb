"""ComBat harmonisation (Johnson, Li & Rabinovic 2007; Fortin et al. 2018) fitted and reused.

Scanner and site shift and scale radiomics features. ComBat models each
feature as covariate effects + a batch location (gamma) and scale (delta),
shrinks the per-batch estimates towards their across-feature means by
parametric empirical Bayes, and removes them. :meth:`ComBat.fit` learns the
parameters on training data; :meth:`ComBat.transform` applies them to new
cases from batches seen in training (a signature card stores them via
:meth:`ComBat.to_dict`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np


class CombatError(ValueError):
    """ComBat cannot fit or apply (too few cases per batch, unknown batch)."""


def _eb_location_scale(
    s: np.ndarray, g_hat: float | np.ndarray, d_hat: np.ndarray, tol: float = 1e-4
) -> tuple[np.ndarray, np.ndarray]:
    """Parametric EB estimates (gamma*, delta*) for one batch; ``s`` is (n_b x p)."""
    g_hat = np.asarray(g_hat, dtype=np.float64)
    n = s.shape[0]
    g_bar, t2 = g_hat.mean(), g_hat.var(ddof=1)
    m, v = d_hat.mean(), d_hat.var(ddof=1)
    a = (2 * v + m**2) / v
    b = (m * v + m**3) / v
    g_old, d_old = g_hat.copy(), d_hat.copy()
    for _ in range(1000):
        g_new = (n * t2 * g_hat + d_old * g_bar) / (n * t2 + d_old)
        sum2 = ((s - g_new) ** 2).sum(axis=0)
        d_new = (0.5 * sum2 + b) / (n / 2 + a - 1)
        change = max(
            np.max(np.abs(g_new - g_old) / np.maximum(np.abs(g_old), 1e-12)),
            np.max(np.abs(d_new - d_old) / np.maximum(np.abs(d_old), 1e-12)),
        )
        g_old, d_old = g_new, d_new
        if change < tol:
            break
    return g_old, d_old


@dataclass
class ComBat:
    """Fitted ComBat parameters (per batch gamma*/delta*, pooled mean/variance, covariate betas)."""

    batches: list[str] = field(default_factory=list)
    grand_mean: np.ndarray = field(default_factory=lambda: np.zeros(0))
    var_pooled: np.ndarray = field(default_factory=lambda: np.zeros(0))
    covariate_beta: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    gamma: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    delta: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))

    def fit(
        self, x: np.ndarray, batch: Sequence[Any], covariates: np.ndarray | None = None
    ) -> ComBat:
        """Learn the parameters from ``x`` (n cases x p features) and each case's batch."""
        x = np.asarray(x, dtype=np.float64)
        labels = np.asarray([str(b) for b in batch])
        self.batches = sorted(set(labels))
        if len(self.batches) < 2:
            raise CombatError("ComBat needs at least two batches")
        counts = {b: int((labels == b).sum()) for b in self.batches}
        small = [b for b, c in counts.items() if c < 2]
        if small:
            raise CombatError(f"batches with fewer than 2 cases: {', '.join(small)}")
        n = x.shape[0]
        onehot = np.column_stack([(labels == b).astype(float) for b in self.batches])
        cov = (
            np.zeros((n, 0)) if covariates is None else np.asarray(covariates, float).reshape(n, -1)
        )
        design = np.hstack([onehot, cov])
        beta = np.linalg.lstsq(design, x, rcond=None)[0]
        weights = np.array([counts[b] / n for b in self.batches])
        self.grand_mean = weights @ beta[: len(self.batches)]
        self.covariate_beta = beta[len(self.batches) :]
        self.var_pooled = ((x - design @ beta) ** 2).mean(axis=0)
        self.var_pooled[self.var_pooled == 0] = 1.0  # constant features pass through unchanged
        s = self._standardise(x, cov)
        gammas, deltas = [], []
        for b in self.batches:
            sb = s[labels == b]
            g, d = _eb_location_scale(sb, sb.mean(axis=0), sb.var(axis=0, ddof=1))
            gammas.append(g)
            deltas.append(d)
        self.gamma, self.delta = np.array(gammas), np.array(deltas)
        return self

    def _standardise(self, x: np.ndarray, cov: np.ndarray) -> np.ndarray:
        stand_mean = self.grand_mean + cov @ self.covariate_beta
        out: np.ndarray = (x - stand_mean) / np.sqrt(self.var_pooled)
        return out

    def transform(
        self, x: np.ndarray, batch: Sequence[Any], covariates: np.ndarray | None = None
    ) -> np.ndarray:
        """Harmonised copy of ``x``; every batch must have been seen by :meth:`fit`."""
        x = np.asarray(x, dtype=np.float64)
        labels = [str(b) for b in batch]
        unknown = sorted(set(labels) - set(self.batches))
        if unknown:
            raise CombatError(f"batch(es) not seen when ComBat was fitted: {', '.join(unknown)}")
        n = x.shape[0]
        cov = (
            np.zeros((n, 0)) if covariates is None else np.asarray(covariates, float).reshape(n, -1)
        )
        s = self._standardise(x, cov)
        idx = np.array([self.batches.index(b) for b in labels])
        adjusted = (s - self.gamma[idx]) / np.sqrt(self.delta[idx])
        out: np.ndarray = (
            adjusted * np.sqrt(self.var_pooled) + self.grand_mean + cov @ self.covariate_beta
        )
        return out

    def subset(self, columns: Sequence[int]) -> ComBat:
        """The parameters of some features only (each feature's transform is its own)."""
        idx = list(columns)
        return ComBat(
            batches=list(self.batches),
            grand_mean=self.grand_mean[idx],
            var_pooled=self.var_pooled[idx],
            covariate_beta=self.covariate_beta[:, idx],
            gamma=self.gamma[:, idx],
            delta=self.delta[:, idx],
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain lists for a signature card."""
        return {
            "batches": self.batches,
            "grand_mean": self.grand_mean.tolist(),
            "var_pooled": self.var_pooled.tolist(),
            "covariate_beta": self.covariate_beta.tolist(),
            "gamma": self.gamma.tolist(),
            "delta": self.delta.tolist(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ComBat:
        """Rebuild from :meth:`to_dict`'s output."""
        return cls(
            batches=list(data["batches"]),
            grand_mean=np.asarray(data["grand_mean"], float),
            var_pooled=np.asarray(data["var_pooled"], float),
            covariate_beta=np.asarray(data["covariate_beta"], float).reshape(
                -1, len(data["grand_mean"])
            ),
            gamma=np.asarray(data["gamma"], float),
            delta=np.asarray(data["delta"], float),
        )
