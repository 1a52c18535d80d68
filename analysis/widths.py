"""A fraction × width grid's analysis: the joint law (`analysis.joint`) on the used trials, its
held-out checks, the one-axis law of each width beside it, the best width at each n on the
grid, and the law's compute-optimal model size beyond the grid.

Pandas on the trial table of `analysis.results`; the fits are numpy/scipy.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from analysis import curvefit as CF
from analysis import joint as J
from analysis import results as R
from raysweep.errors import RaysweepError

BEYOND = (1, 2, 4, 10)  # the frontier is stated at these multiples of the largest n measured
# Each width's own bootstrap: an interval for alpha to set beside the joint one, at a fifth of the
# default resamples (a pow3 resample costs ~10 ms; 1000 per width would dominate the whole analysis).
PER_WIDTH_BOOT = 200


def widths_of(trials: pd.DataFrame) -> list[float]:
    """The grid's distinct widths; [] for a table without the column (an older, one-width sweep)."""
    if "width" not in trials:
        return []
    return sorted(float(w) for w in trials["width"].dropna().unique())


def model_sizes(used: pd.DataFrame) -> dict[float, int]:
    """Parameters of each width, from the trials' final reports."""
    if "num_params" not in used or used["num_params"].isna().any():
        missing = used.loc[used.get("num_params", pd.Series(index=used.index, dtype=float)).isna(), "trial_id"]
        raise RaysweepError(f"joint law: trial {missing.iloc[0]} does not report num_params (the model size m); "
                            "rerun the sweep with a raysweep that reports it")
    sizes = used.groupby("width")["num_params"].agg(lambda s: int(s.mode().iloc[0]))
    return {float(w): int(p) for w, p in sizes.items()}


def cell_table(used: pd.DataFrame, metric: str) -> pd.DataFrame:
    """One row per (width, fraction): num_params, n_train, seeds, and the mean, std and 95% CI of
    `metric` over the seeds (Student's t, as the per-fraction table)."""
    params = model_sizes(used)
    frames = []
    for w, group in used.groupby("width", sort=True):
        s = R.per_fraction_summary(group, metrics=[metric])
        s.insert(0, "width", float(w))
        s.insert(1, "num_params", params[float(w)])
        frames.append(s.rename(columns=lambda c: c.replace(f"{metric}_", "")))
    return pd.concat(frames, ignore_index=True)


def best_on_grid(cells: pd.DataFrame) -> pd.DataFrame:
    """For each n: the width with the least mean error, and how far the runner-up was behind."""
    rows = []
    for n, g in cells.dropna(subset=["mean"]).groupby("n_train", sort=True):
        g = g.sort_values("mean")
        best = g.iloc[0]
        gap = float(g.iloc[1]["mean"] - best["mean"]) if len(g) > 1 else math.nan
        rows.append({"n_train": int(n), "best_width": float(best["width"]), "num_params": int(best["num_params"]),
                     "mean": float(best["mean"]), "ci_low": float(best["ci_low"]), "ci_high": float(best["ci_high"]),
                     "runner_up": float(g.iloc[1]["width"]) if len(g) > 1 else None, "gap": gap,
                     "widest": bool(best["width"] == cells["width"].max())})
    return pd.DataFrame(rows)


def per_width_fits(used: pd.DataFrame, metric: str, n_boot: int, seed: int = 0) -> list[dict]:
    """The one-axis law (pow3) of each width on its own, with its bootstrap, or the reason there is none."""
    out = []
    for w, group in used.groupby("width", sort=True):
        n, err = group["n_train"].to_numpy(float), group[metric].to_numpy(float)
        row = {"width": float(w), "num_params": int(group["num_params"].mode().iloc[0]), "fit": None,
               "intervals": None, "reason": None}
        try:
            if n_boot > 0:
                boot = CF.bootstrap_curve("pow3", n, err, group["fraction"].to_numpy(), n_boot=n_boot, seed=seed)
                row.update(fit=boot.fit.to_dict(), intervals=boot.to_dict(), _fit=boot.fit, _boot=boot)
            else:
                fit = CF.fit_curve("pow3", n, err)
                row.update(fit=fit.to_dict(), _fit=fit)
        except RaysweepError as e:
            row["reason"] = str(e)
        out.append(row)
    return out


def width_for_params(params: dict[float, int], m) -> np.ndarray:
    """The width that would have `m` parameters, from the line log m = k + p·log width through the
    grid's widths (AlexNet's count grows between linearly and quadratically with width)."""
    w = np.log(list(params))
    p, k = np.polyfit(w, np.log(list(params.values())), 1)
    return np.exp((np.log(np.asarray(m, dtype=float)) - k) / p)


def beyond_grid(boot: J.JointBootstrap | None, fit: J.JointFit, n_max: float, params: dict[float, int]) -> list[dict]:
    """The compute-optimal m*(n) (`analysis.joint.frontier`) at multiples of the largest n, with the
    width that has that many parameters and the law's error there."""
    rows = []
    for k in BEYOND:
        n = n_max * k
        m = float(J.frontier(fit.values, n))
        row = {"n_train": n, "times_largest": k, "num_params": m, "width": float(width_for_params(params, m)),
               "error": float(fit.predict(n, m)), "interval": None}
        if boot is not None:
            lo, hi = boot.frontier_interval(n)
            row["interval"] = [float(lo[0]), float(hi[0])]
        rows.append(row)
    return rows


def analyse_joint(used: pd.DataFrame, metric: str, n_boot: int, seed: int = 0, eps0: float | None = None) -> dict:
    """Everything the report, fit.json and the figures show of the joint law; each part that
    cannot be computed says why. Private `_` entries hold the objects, the rest is JSON."""
    out: dict = {"metric": metric, "envelope": eps0 is not None, "eps0": eps0, "widths": widths_of(used),
                 "fit": None, "no_fit_reason": None, "intervals": None, "holdout_n": None,
                 "holdout_n_reason": None, "holdout_m": None, "holdout_m_reason": None, "per_width": [],
                 "cells": [], "best_on_grid": [], "frontier": [], "frontier_reason": None, "bootstrap_seed": seed}
    if used.empty:
        out["no_fit_reason"] = "no usable trials: every trial was left out of the fit"
        return out
    try:
        params = model_sizes(used)
        out["num_params"] = {f"{w:g}": p for w, p in params.items()}
        cells = cell_table(used, metric)
        out["_cells"], out["cells"] = cells, cells.to_dict(orient="records")
        best = best_on_grid(cells)
        out["_best"], out["best_on_grid"] = best, best.to_dict(orient="records")
        n, err = used["n_train"].to_numpy(float), used[metric].to_numpy(float)
        m = used["width"].map(params).to_numpy(float)
        boot = J.bootstrap_joint(n, m, err, eps0, n_boot=n_boot, seed=seed) if n_boot > 0 else None
        fit = boot.fit if boot else J.fit_joint(n, m, err, eps0)
    except RaysweepError as e:
        out["no_fit_reason"] = str(e)
        return out
    out.update(fit=fit.to_dict(), intervals=boot.to_dict() if boot else None, _fit=fit, _boot=boot)
    for axis in ("n", "m"):
        try:
            h = J.holdout_joint(n, m, err, axis, eps0)
            out[f"_holdout_{axis}"], out[f"holdout_{axis}"] = h, h.to_dict()
        except RaysweepError as e:
            out[f"holdout_{axis}_reason"] = str(e)
    out["_per_width"] = per_width_fits(used, metric, min(n_boot, PER_WIDTH_BOOT), seed)
    out["per_width"] = [{k: v for k, v in row.items() if not k.startswith("_")} for row in out["_per_width"]]
    out["frontier_reason"] = J.frontier_reason(fit, n, m)
    out["frontier"] = [] if out["frontier_reason"] else beyond_grid(boot, fit, float(n.max()), params)
    out["frontier_rule"] = ("compute-optimal model size at a fixed compute C ∝ m·n: "
                            "m*(n) = (beta·b/(alpha·a))^(1/beta) · n^(alpha/beta)")
    return out
