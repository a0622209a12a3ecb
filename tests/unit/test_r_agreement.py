"""The survival statistics agree with R (survival 3.5, glmnet 4.1) on a fixed data set.

R runs as a subprocess (``Rscript`` on a script written to ``tmp_path``), the
data travel by CSV. Without ``Rscript`` or its packages the test skips, or
fails under CI (``CI=true``); ``make test`` installs Debian's
``r-cran-survival r-cran-glmnet`` when run as root.

The data: 60 cases, 10 z-scored features (ddof=0, as the signatures do) plus
an exact copy of one of them, which :func:`distinct_columns` drops before
the LASSO as the fits do. Event times are whole days and censoring times
half days, so events tie with events and censorings with censorings, but
no censoring ties an event: glmnet 4.1 keeps such a censoring in the risk
set or not depending on the order of the rows (R's ``coxph``, scikit-survival
and lifelines always keep it).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipelines.signature.dedupe import distinct_columns
from pipelines.signature.survival import cox, harrell_c, lasso_cox

R_PACKAGES = ("survival", "glmnet")

R_SCRIPT = r"""
suppressMessages({library(survival); library(glmnet)})
args <- commandArgs(trailingOnly = TRUE)
d <- read.csv(args[1], check.names = FALSE)
lambda <- as.numeric(args[2])
features <- scan(args[3], what = "", quiet = TRUE)
x <- as.matrix(d[, features])
y <- Surv(d$time, d$event)
out <- list()
# LASSO-Cox at the given lambda: glmnet's objective is -loglik/n + lambda*sum|b|
# (Breslow ties), the inputs are z-scored already.
fit <- glmnet(x, y, family = "cox", lambda = lambda, standardize = FALSE,
              thresh = 1e-14, maxit = 1e7)
b <- as.numeric(coef(fit))
out[[length(out) + 1]] <- data.frame(what = "lasso", name = features, value = b)
# Cox (Efron ties, coxph's default) on three features.
cph <- coxph(Surv(time, event) ~ f00 + f01 + f02, data = d,
             control = coxph.control(eps = 1e-12, toler.chol = 1e-13, iter.max = 100))
out[[length(out) + 1]] <- data.frame(what = "coxph", name = names(coef(cph)), value = coef(cph))
# Harrell's C of the Python linear predictors: higher risk should fail first (reverse).
for (score in c("lp", "lp_rounded")) {
  f <- as.formula(paste("Surv(time, event) ~", score))
  cc <- concordance(f, data = d, reverse = TRUE)
  out[[length(out) + 1]] <- data.frame(what = "concordance", name = score,
                                       value = cc$concordance)
}
write.csv(do.call(rbind, out), args[4], row.names = FALSE)
"""


def _rscript() -> str:
    """Path of Rscript with survival and glmnet; skip, or fail under CI, without them."""
    found = shutil.which("Rscript")
    problem = None
    if found is None:
        problem = "Rscript is not installed"
    else:
        check = "; ".join(f"library({p})" for p in R_PACKAGES)
        proc = subprocess.run(
            [found, "-e", check], capture_output=True, text=True, timeout=120, check=False
        )
        if proc.returncode != 0:
            problem = f"R lacks {' or '.join(R_PACKAGES)}: {proc.stderr.strip()[-300:]}"
    if problem is None:
        assert found is not None
        return found
    message = f"{problem}; `make test` installs r-cran-survival r-cran-glmnet as root"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)
    raise AssertionError("unreachable")


def cohort(seed: int = 20) -> pd.DataFrame:
    """60 cases, f00..f09 z-scored (ddof=0) plus ``f10``, an exact copy of f00 after z-scoring."""
    rng = np.random.default_rng(seed)
    n, p = 60, 10
    x = rng.normal(size=(n, p))
    x[:, 3] = 0.7 * x[:, 0] + 0.3 * rng.normal(size=n)  # correlated, as radiomics are
    lp = 0.9 * x[:, 0] - 0.7 * x[:, 1] + 0.5 * x[:, 2]
    event_time = np.ceil(20 * rng.exponential(1 / np.exp(lp)))  # whole days: tied events
    censor_time = np.floor(20 * rng.exponential(1.5, n)) + 0.5  # half days: never an event's
    frame = pd.DataFrame(x, columns=[f"f{i:02d}" for i in range(p)])
    frame["f10"] = 3.0 * frame["f00"] + 7.0  # Energy and TotalEnergy at a fixed voxel size
    z = (frame - frame.mean()) / frame.std(ddof=0)
    z["time"] = np.minimum(event_time, censor_time)
    z["event"] = (event_time <= censor_time).astype(int)
    return z


def run_r(tmp_path: Path, data: pd.DataFrame, lam: float, features: list[str]) -> pd.DataFrame:
    """Run :data:`R_SCRIPT` on ``data``; its results as rows (what, name, value)."""
    rscript = _rscript()
    script = tmp_path / "agreement.R"
    script.write_text(R_SCRIPT)
    data.to_csv(tmp_path / "data.csv", index=False, float_format="%.17g")
    (tmp_path / "features.txt").write_text("\n".join(features) + "\n")
    out = tmp_path / "r.csv"
    proc = subprocess.run(
        [
            rscript,
            str(script),
            str(tmp_path / "data.csv"),
            repr(lam),
            str(tmp_path / "features.txt"),
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return pd.read_csv(out)


def test_lasso_cox_concordance_and_cox_agree_with_r(tmp_path: Path) -> None:
    data = cohort()
    time, event = data["time"].to_numpy(float), data["event"].to_numpy(int)
    assert data["time"][data["event"] == 1].duplicated().any()  # tied events: Breslow matters
    assert not set(data["time"][data["event"] == 1]) & set(data["time"][data["event"] == 0])

    features = distinct_columns(data.drop(columns=["time", "event"]))
    assert "f10" not in features and len(features) == 10
    coef, lam, _ = lasso_cox(data[features], time, event, folds=5, seed=0)
    assert 3 <= int((coef != 0).sum()) < len(features)  # a penalty that selects

    model = cox(data, "time", "event", ["f00", "f01", "f02"])
    data["lp"] = model.linear_predictor(data)
    data["lp_rounded"] = np.round(data["lp"], 1)  # ties in the score count one half
    assert data["lp_rounded"].duplicated().any()

    r = run_r(tmp_path, data, lam, features)
    glmnet = r[r["what"] == "lasso"].set_index("name")["value"]
    assert np.abs(coef[features].to_numpy() - glmnet[features].to_numpy()).max() < 1e-4
    assert set(coef[coef != 0].index) == set(glmnet[glmnet != 0].index)

    coxph = r[r["what"] == "coxph"].set_index("name")["value"]
    for name in ("f00", "f01", "f02"):
        assert model.coefficients[name] == pytest.approx(coxph[name], abs=1e-5)

    concordance = r[r["what"] == "concordance"].set_index("name")["value"]
    for score in ("lp", "lp_rounded"):
        ours = harrell_c(time, event, data[score].to_numpy(float))
        assert ours == pytest.approx(concordance[score], abs=1e-6)
