"""The joint law over training-set size n and model size m (parameters), after Rosenfeld et al. 2020:
eps(m, n) = a·n^(-alpha) + b·m^(-beta) + c, optionally inside their envelope that bends it toward
the random-guess error eps0; its fit, bootstrap over seeds, held-out checks on each axis, and the
compute frontier it implies. Pure numpy/scipy.

How it is fitted, and why. Rosenfeld et al. fit least squares on the relative deviation
delta = (eps_hat - eps_measured) / eps_measured, so that a point at 5% error counts as much as
one at 60%; this module minimises the same residual (to first order it is the log-space
residual `analysis.curvefit` uses for one axis). Their envelope is
eps_hat = eps0·|eps / (eps - i·eta)| = eps0·eps / sqrt(eps^2 + eta^2), with a fixed at 1, since
scaling a, b, c and eta together leaves eps_hat unchanged. Writing u = eps·eps0/eta gives the
same family as eps_hat = u / sqrt(1 + (u/eps0)^2) with u = a·n^(-alpha) + b·m^(-beta) + c: the
parameters stay in error units (u is the power-law region the envelope joins to eps0), and the
paper's eta is eps0/a (their b and c_inf are b/a and c/a). Both forms have five free parameters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from analysis.curvefit import LEVEL, _interval, resamples
from analysis.curves import check_points
from analysis.extrapolation import HeldOutMisses
from raysweep.errors import RaysweepError

PARAMS = ("a", "alpha", "b", "beta", "c")
EXPONENT_MAX = 3.0  # an exponent above 3 is no power law these grids could tell from a step
_START_EXPONENTS = (0.1, 0.25, 0.5, 0.8, 1.2)
FLAT_POINTS = 0.005  # a term that moves the error by less than half a point across the grid sets no frontier


def random_guess_error(metric: str, num_classes: int) -> float:
    """eps0 = 1 - k/C: the top-k error of a guess among C classes (0.95 for top-5 of 100)."""
    k = 5 if "top5" in metric else 1
    if num_classes <= k:
        raise RaysweepError(f"the envelope needs more classes than k: {metric} with {num_classes} classes "
                            "has a random-guess error of 0")
    return 1.0 - k / num_classes


def _u(values, n, m):
    a, alpha, b, beta, c = values
    return a * n ** -alpha + b * m ** -beta + c


def law(values, n, m, eps0: float | None = None):
    """The law at (n, m); `values` in PARAMS order (entries may be arrays of resamples)."""
    u = _u(values, np.asarray(n, dtype=float), np.asarray(m, dtype=float))
    return u if eps0 is None else u / np.sqrt(1.0 + (u / eps0) ** 2)


@dataclass(frozen=True)
class JointFit:
    """The fitted law. `rmse_rel` is the RMS relative deviation (the fitted residual), `rmse` the
    RMS deviation in error units; `n_cells` the distinct (n, m) of the grid."""

    values: tuple[float, ...]
    eps0: float | None
    n_points: int
    n_sizes: int
    n_models: int
    n_cells: int
    rmse_rel: float
    rmse: float
    at_bound: tuple[str, ...] = ()

    def __getattr__(self, name):
        if name == "values":
            raise AttributeError(name)
        if name in PARAMS:
            return self.values[PARAMS.index(name)]
        raise AttributeError(name)

    @property
    def params(self) -> dict[str, float]:
        return dict(zip(PARAMS, self.values))

    @property
    def envelope(self) -> bool:
        return self.eps0 is not None

    @property
    def eta(self) -> float | None:
        """The paper's eta (with its a = 1)."""
        return self.eps0 / self.a if self.envelope else None

    def predict(self, n, m) -> np.ndarray:
        return law(self.values, n, m, self.eps0)

    def formula(self, digits: int = 3) -> str:
        u = (f"{self.a:.{digits}g}·n^(-{self.alpha:.3f}) + {self.b:.{digits}g}·m^(-{self.beta:.3f}) "
             f"+ {self.c:.4f}")
        if not self.envelope:
            return f"err(n, m) = {u}"
        return f"err(n, m) = u / sqrt(1 + (u/{self.eps0:.3g})^2), u = {u}"

    def to_dict(self) -> dict:
        return {**self.params, "envelope": self.envelope, "eps0": self.eps0, "eta": self.eta,
                "n_points": self.n_points, "n_sizes": self.n_sizes, "n_models": self.n_models,
                "n_cells": self.n_cells, "rmse_rel": self.rmse_rel, "rmse": self.rmse,
                "at_bound": list(self.at_bound), "formula": self.formula()}


def _check(n, m, err) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n, err = check_points(n, err)
    m = np.asarray(m, dtype=float).ravel()
    if m.shape != n.shape:
        raise RaysweepError(f"joint law: {n.size} sizes but {m.size} parameter counts")
    bad = np.flatnonzero(~np.isfinite(m) | (m <= 0))
    if bad.size:
        raise RaysweepError(f"joint law: parameter count at point {bad[0]} is {m[bad[0]]}; every trial must "
                            "report num_params (a positive count)")
    models = np.unique(m)
    if models.size < 2:
        raise RaysweepError(f"joint law needs at least 2 model widths; this grid has one ({models[0]:,.0f} "
                            "parameters): fit the one-axis law, or sweep --widths")
    cells = np.unique(np.column_stack([n, m]), axis=0).shape[0]
    if cells < len(PARAMS) + 1:
        raise RaysweepError(f"joint law has {len(PARAMS)} parameters and needs at least {len(PARAMS) + 1} "
                            f"distinct (n, width) cells, got {cells}")
    return n, m, err


def _starts(n, m, err, eps0):
    """Variable projection on a grid of exponents: given alpha and beta the law (in u) is linear
    in a, b, c, solved by non-negative least squares on the relative residual."""
    from scipy.optimize import nnls

    target = err if eps0 is None else err / np.sqrt(1 - np.minimum(err / eps0, 0.999) ** 2)
    found = []
    for alpha in _START_EXPONENTS:
        for beta in _START_EXPONENTS:
            design = np.column_stack([n ** -alpha, m ** -beta, np.ones_like(n)]) / target[:, None]
            (a, b, c), rnorm = nnls(design, np.ones_like(n))
            c = min(c, 0.9 * err.min())
            found.append((rnorm, [math.log(max(a, 1e-12)), alpha, math.log(max(b, 1e-12)), beta, c]))
    found.sort(key=lambda t: t[0])
    return [np.array(x) for _, x in found[:4]]


def _solve(n, m, err, eps0, starts):
    from scipy.optimize import least_squares

    logn, logm = np.log(n), np.log(m)
    lo = np.array([-60.0, 1e-4, -60.0, 1e-4, 0.0])
    hi = np.array([60.0, EXPONENT_MAX, 60.0, EXPONENT_MAX, float(err.min()) * (1 - 1e-9)])

    def pred(t):
        A, B = np.exp(t[0] - t[1] * logn), np.exp(t[2] - t[3] * logm)
        u = A + B + t[4]
        return u, A, B

    def resid(t):
        u = pred(t)[0]
        p = u if eps0 is None else u / np.sqrt(1 + (u / eps0) ** 2)
        return p / err - 1.0

    def jac(t):
        u, A, B = pred(t)
        dp = 1.0 if eps0 is None else (1 + (u / eps0) ** 2) ** -1.5
        scale = dp / err
        return np.column_stack([A, -logn * A, B, -logm * B, np.ones_like(u)]) * np.asarray(scale)[..., None]

    best = None
    for x0 in starts:
        res = least_squares(resid, np.clip(x0, lo, hi), jac=jac, bounds=(lo, hi), method="trf", x_scale="jac",
                            xtol=1e-12, ftol=1e-12, gtol=1e-12, max_nfev=3000)
        if np.isfinite(res.cost) and (best is None or res.cost < best.cost):
            best = res
    if best is None:
        raise RaysweepError("joint law: no start converged")
    names = ("a", "alpha", "b", "beta", "c")
    at_bound = tuple(f"{p}<=max" for p, t, h in zip(names, best.x, hi) if t >= h - 1e-6 * max(1.0, abs(h))) + \
        tuple(f"{p}>=min" for p, t, l in zip(names, best.x, lo) if p != "c" and t <= l + 1e-6 * max(1.0, abs(l)))
    t = best.x
    return (math.exp(t[0]), float(t[1]), math.exp(t[2]), float(t[3]), float(t[4])), at_bound


def fit_joint(n, m, err, eps0: float | None = None, start: tuple | None = None) -> JointFit:
    """Fit the law to points (n_i, m_i, err_i), one per trial, by least squares on the relative
    deviation (see the module's docstring); `eps0` switches the envelope on. `start` (values in
    PARAMS order) replaces the grid of starts, as the bootstrap does from the full fit.

    Raises RaysweepError on bad points, on one model width, or on fewer cells than parameters + 1.
    """
    n, m, err = _check(n, m, err)
    if eps0 is not None and not 0 < eps0 <= 1:
        raise RaysweepError(f"joint law: random-guess error eps0 {eps0!r} must lie in (0, 1]")
    if start is not None:
        a, alpha, b, beta, c = start
        starts = [np.array([math.log(a), alpha, math.log(b), beta, min(c, 0.9 * err.min())])]
    else:
        starts = _starts(n, m, err, eps0)
    values, at_bound = _solve(n, m, err, eps0, starts)
    pred = law(values, n, m, eps0)
    return JointFit(values=values, eps0=eps0, n_points=int(n.size), n_sizes=int(np.unique(n).size),
                    n_models=int(np.unique(m).size), n_cells=int(np.unique(np.column_stack([n, m]), axis=0).shape[0]),
                    rmse_rel=float(np.sqrt(np.mean((pred / err - 1) ** 2))),
                    rmse=float(np.sqrt(np.mean((pred - err) ** 2))), at_bound=at_bound)


def frontier_reason(fit: "JointFit", n, m) -> str | None:
    """Why the law gives no compute frontier on a grid spanning sizes `n` and models `m` (None: it
    does): a term that moves the error by less than FLAT_POINTS across the grid (e.g. width does not
    matter) leaves m* to be set by noise, with an exponent alpha/beta of any size."""
    n, m = np.asarray(n, dtype=float), np.asarray(m, dtype=float)
    spans = {"data": fit.a * (n.min() ** -fit.alpha - n.max() ** -fit.alpha),
             "model-size": fit.b * (m.min() ** -fit.beta - m.max() ** -fit.beta)}
    flat = [f"{k} term moves the error by {100 * v:.2f} points" for k, v in spans.items() if v < FLAT_POINTS]
    if not flat:
        return None
    return (f"across the grid the law's {' and its '.join(flat)} (threshold: {100 * FLAT_POINTS:g} points), "
            "so it sets no trade-off between data and model size")


def frontier(values, n):
    """The compute-optimal model size for n images: at a fixed compute C ∝ m·n (each epoch costs
    parameters × images), the law's error is least where alpha·a·n^(-alpha) = beta·b·m^(-beta), so
    m*(n) = (beta·b / (alpha·a))^(1/beta) · n^(alpha/beta). The envelope is monotone in u and c
    is a constant, so neither moves it. `values` entries may be arrays of resamples."""
    a, alpha, b, beta, _ = (np.asarray(v, dtype=float)[..., None] for v in values)
    n = np.asarray(n, dtype=float)
    with np.errstate(over="ignore", divide="ignore", invalid="ignore", under="ignore"):
        return np.squeeze((beta * b / (alpha * a)) ** (1 / beta) * n ** (alpha / beta))


@dataclass(frozen=True)
class JointBootstrap:
    """The fit to all points and to `n_ok` resamples of the seeds within each (n, width) cell:
    `samples` holds one row of PARAMS per resample."""

    fit: JointFit
    samples: np.ndarray = field(repr=False)
    n_boot: int
    n_failed: int
    level: float = LEVEL

    @property
    def n_ok(self) -> int:
        return int(self.samples.shape[0])

    def column(self, name: str) -> np.ndarray:
        if name == "eta":
            return self.fit.eps0 / self.samples[:, 0]
        if name == "frontier_exponent":
            return self.samples[:, 1] / self.samples[:, 3]
        return self.samples[:, PARAMS.index(name)]

    def interval(self, name: str) -> tuple[float, float]:
        return _interval(self.column(name), self.level)

    def predict_interval(self, n, m) -> tuple[np.ndarray, np.ndarray]:
        n, m = np.broadcast_arrays(np.atleast_1d(np.asarray(n, float)), np.atleast_1d(np.asarray(m, float)))
        preds = law([self.samples[:, [i]] for i in range(len(PARAMS))], n[None, :], m[None, :], self.fit.eps0)
        lo, hi = np.quantile(preds, [(1 - self.level) / 2, (1 + self.level) / 2], axis=0)
        return lo, hi

    def frontier_interval(self, n) -> tuple[np.ndarray, np.ndarray]:
        ms = frontier(self.samples.T, np.atleast_1d(n)).reshape(self.n_ok, -1)
        q = np.quantile(ms, [(1 - self.level) / 2, (1 + self.level) / 2], axis=0, method="inverted_cdf")
        return q[0], q[1]

    def to_dict(self) -> dict:
        names = [*PARAMS, "frontier_exponent"] + (["eta"] if self.fit.envelope else [])
        return {"level": self.level, "n_boot": self.n_boot, "n_failed": self.n_failed,
                **{f"{p}_ci": list(self.interval(p)) for p in names}}


def cells_of(n, m) -> np.ndarray:
    """A label per point: its (n, m) cell, the group the bootstrap resamples within."""
    return np.unique(np.column_stack([n, m]), axis=0, return_inverse=True)[1].ravel()


def bootstrap_joint(n, m, err, eps0: float | None = None, n_boot: int = 1000, seed: int = 0,
                    level: float = LEVEL) -> JointBootstrap:
    """Fit, then refit `n_boot` times on the trials resampled within each (n, m) cell, each refit
    started from the full fit (the grid of starts would cost 4x and the optimum seldom moves far)."""
    n, m, err = _check(n, m, err)
    full = fit_joint(n, m, err, eps0)
    rows, failed = [], 0
    for idx in resamples(cells_of(n, m), n_boot, seed):
        try:
            rows.append(fit_joint(n[idx], m[idx], err[idx], eps0, start=full.values).values)
        except (RaysweepError, ValueError, FloatingPointError):
            failed += 1
    if not rows:
        raise RaysweepError(f"joint bootstrap: none of the {n_boot} resamples could be fitted")
    return JointBootstrap(fit=full, samples=np.array(rows), n_boot=n_boot, n_failed=failed, level=level)


@dataclass(frozen=True)
class JointHoldout(HeldOutMisses):
    """The law fitted without the largest n (axis "n", at every width) or without the widest model
    (axis "m", at every n), judged on the held-out cells as the one-axis zoo judges: the mean
    |predicted - measured mean| over them, in error units (x100: points)."""

    axis: str
    held: float
    cells: tuple[tuple[float, float], ...]  # (n, m) of each held-out cell
    observed_each: tuple[float, ...]
    predicted_each: tuple[float, ...]
    fit: JointFit

    @property
    def max_abs_error(self) -> float:
        return float(np.max(np.abs(self.errors)))

    def to_dict(self) -> dict:
        return {"axis": self.axis, "held": self.held, "cells": [list(c) for c in self.cells],
                "observed_each": list(self.observed_each), "predicted_each": list(self.predicted_each),
                "mean_abs_error": self.mean_abs_error, "max_abs_error": self.max_abs_error,
                "fit": self.fit.to_dict()}


def holdout_joint(n, m, err, axis: str, eps0: float | None = None) -> JointHoldout:
    """Leave out the largest n ("n") or the largest m ("m"), fit the rest, predict what was left out.
    Raises RaysweepError when what remains cannot be fitted (e.g. 3 sizes leave 2)."""
    n, m, err = _check(n, m, err)
    x = n if axis == "n" else m
    held = float(np.max(x))
    keep = x < held
    what = "the largest training-set size" if axis == "n" else "the widest model"
    try:
        fit = fit_joint(n[keep], m[keep], err[keep], eps0)
    except RaysweepError as e:
        raise RaysweepError(f"held-out check without {what}: {e}") from e
    cells = np.unique(np.column_stack([n[~keep], m[~keep]]), axis=0)
    observed = [float(err[(n == cn) & (m == cm)].mean()) for cn, cm in cells]
    return JointHoldout(axis=axis, held=held, cells=tuple((float(a), float(b)) for a, b in cells),
                        observed_each=tuple(observed),
                        predicted_each=tuple(float(v) for v in fit.predict(cells[:, 0], cells[:, 1])), fit=fit)
