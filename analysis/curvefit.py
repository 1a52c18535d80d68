"""Fitting a curve family (`analysis.curves`) to trials: least squares in log space from several
starts, information criteria, percentile bootstrap over seeds within each size, and the
inversion from a target error to a training-set size. scipy is imported where a fit needs it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from analysis.curves import CurveModel, check_points, get_model, loglog_line
from raysweep.errors import RaysweepError

LEVEL = 0.95


@dataclass(frozen=True)
class CurveFit:
    """A fitted curve. Residuals are in log space, where the fit is made: `rmse_log` is the RMS of
    log(predicted) - log(observed), `r2_log` the share of the variance of log(err) explained,
    `rmse` the same residual in error units; `aic`/`bic` come from the log-space residuals
    (Gaussian likelihood, k parameters, n_points trials). Parameters read as attributes (fit.alpha)."""

    model: CurveModel
    values: tuple[float, ...]
    n_points: int
    n_sizes: int
    rmse_log: float
    r2_log: float
    rmse: float
    aic: float
    bic: float
    at_bound: tuple[str, ...] = ()  # parameters the optimizer left on a bound

    def __getattr__(self, name):
        if name in ("model", "values"):  # not yet set (e.g. while unpickling)
            raise AttributeError(name)
        if name in self.model.params:
            return self.values[self.model.params.index(name)]
        if name in self.model.fixed:
            return self.model.fixed[name]
        raise AttributeError(name)

    @property
    def params(self) -> dict[str, float]:
        return dict(zip(self.model.params, self.values))

    @property
    def irreducible(self) -> bool:
        return self.model.plateau is not None

    @property
    def c_at_bound(self) -> bool:
        """The plateau sits at its upper bound, the smallest error: the data do not bound it."""
        return self.model.plateau is not None and f"{self.model.plateau}<=max" in self.at_bound

    def predict(self, n) -> np.ndarray:
        return self.model.predict(self.values, n)

    def formula(self, digits: int = 3) -> str:
        return self.model.show(self.params, digits)

    def to_dict(self) -> dict:
        return {"model": self.model.name, **self.params, **self.model.fixed, "irreducible": self.irreducible,
                "n_points": self.n_points, "n_sizes": self.n_sizes, "rmse_log": self.rmse_log,
                "r2_log": self.r2_log, "rmse": self.rmse, "aic": self.aic, "bic": self.bic,
                "at_bound": list(self.at_bound), "c_at_bound": self.c_at_bound, "formula": self.formula()}


def _least_squares(model: CurveModel, n, err, lo, hi):
    from scipy.optimize import least_squares

    logn, logerr = np.log(n), np.log(err)
    best = None
    for x0 in model.starts(n, err):
        x0 = np.clip(x0, lo, hi)
        res = least_squares(lambda t: model.log_pred(t, n, logn) - logerr, x0,
                            jac=(lambda t: model.jac(t, n, logn)) if model.jac else "2-point",
                            bounds=(lo, hi), method="trf", x_scale="jac",
                            xtol=1e-13, ftol=1e-13, gtol=1e-13, max_nfev=2000)
        if np.isfinite(res.cost) and (best is None or res.cost < best.cost):
            best = res
    if best is None:
        raise RaysweepError(f"{model.name} fit: no start converged")
    return best.x


def fit_curve(model: CurveModel | str, n, err) -> CurveFit:
    """Fit `model` to points (n_i, err_i), one per trial, by least squares on log(err).

    Every size counts alike whatever its error level. Raises RaysweepError on bad points (see
    `check_points`), on fewer distinct sizes than the model has parameters, and, for the
    families that only fall, on errors that do not fall with size.
    """
    model = get_model(model) if isinstance(model, str) else model
    n, err = check_points(n, err)
    n_sizes = int(np.unique(n).size)
    if n_sizes < model.k:
        raise RaysweepError(f"{model.name} has {model.k} parameters and needs at least {model.k} distinct "
                            f"training-set sizes, got {n_sizes}")
    if model.decreasing and loglog_line(n, err)[1] <= 0:
        raise RaysweepError(
            f"power-law fit: the error does not fall with training-set size (log-log slope "
            f"{-loglog_line(n, err)[1]:+.3g}); there is no decreasing law a*n^(-alpha) + c to fit"
        )
    lo, hi = (np.asarray(b, dtype=float) for b in model.bounds(n, err))
    theta = model.solve(n, err) if model.solve else _least_squares(model, n, err, lo, hi)
    values = tuple(float(v) for v in model.to_params(theta))
    resid = model.log_pred(theta, n, np.log(n)) - np.log(err)
    pred = np.exp(model.log_pred(theta, n, np.log(n)))
    rss = float(np.sum(resid**2))
    ss_tot = float(np.sum((np.log(err) - np.log(err).mean()) ** 2))
    # A perfect fit has rss 0 and log(0) = -inf; the floor keeps AIC/BIC finite and ordered.
    loglik_term = n.size * math.log(max(rss, 1e-300) / n.size)
    at_bound = []
    for name, t, l, h in zip(model.theta_names, theta, lo, hi):
        if np.isfinite(h) and t >= h - 1e-6 * max(1.0, abs(h)):
            at_bound.append(f"{name}<=max")
        elif np.isfinite(l) and t <= l + 1e-6 * max(1.0, abs(l)) and not (name == model.plateau and l == 0):
            at_bound.append(f"{name}>=min")  # a plateau of 0 is an answer, not a pinned optimizer
    return CurveFit(model=model, values=values, n_points=int(n.size), n_sizes=n_sizes,
                    rmse_log=math.sqrt(rss / n.size), r2_log=1.0 - rss / ss_tot,
                    rmse=float(np.sqrt(np.mean((pred - err) ** 2))),
                    aic=loglik_term + 2 * model.k, bic=loglik_term + model.k * math.log(n.size),
                    at_bound=tuple(at_bound))



def _interval(samples: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    # inverted_cdf picks observed samples, so an infinite sample (unreachable) stays inf, not NaN.
    q = np.quantile(samples, [(1 - level) / 2, (1 + level) / 2], method="inverted_cdf")
    return float(q[0]), float(q[1])


@dataclass(frozen=True)
class CurveBootstrap:
    """The fit to all points, and the fits to `n_ok` resamples of the trials: `samples` holds one
    row of parameters per resample (columns in model.params order); `boot.alpha` is a column."""

    fit: CurveFit
    samples: np.ndarray = field(repr=False)
    n_boot: int
    n_failed: int  # resamples with no fit (e.g. every resampled error equal)
    level: float = LEVEL

    def __getattr__(self, name):
        if name in ("fit", "samples"):
            raise AttributeError(name)
        if name in self.fit.model.params:
            return self.samples[:, self.fit.model.params.index(name)]
        if name in self.fit.model.fixed:
            return np.full(self.samples.shape[0], self.fit.model.fixed[name])
        raise AttributeError(name)

    @property
    def n_ok(self) -> int:
        return int(self.samples.shape[0])

    def interval(self, param: str) -> tuple[float, float]:
        """Percentile interval of one parameter over the resamples."""
        return _interval(getattr(self, param), self.level)

    def predict_interval(self, n) -> tuple[np.ndarray, np.ndarray]:
        """Pointwise percentile band of the predicted error at sizes `n`."""
        n = np.atleast_1d(np.asarray(n, dtype=float))
        cols = [self.samples[:, [i]] for i in range(self.samples.shape[1])]
        preds = self.fit.model.predict(cols, n[None, :])
        lo, hi = np.quantile(preds, [(1 - self.level) / 2, (1 + self.level) / 2], axis=0)
        return lo, hi

    def to_dict(self) -> dict:
        out = {"level": self.level, "n_boot": self.n_boot, "n_failed": self.n_failed}
        for p in self.fit.model.params:
            out[f"{p}_ci"] = list(self.interval(p))
        return out


def resamples(groups, n_boot: int, seed: int = 0):
    """`n_boot` index arrays, each drawn with replacement within every group of equal labels
    (so each group keeps its size: the seeds of one grid cell are resampled, never the cells)."""
    groups = np.asarray(groups)
    members = [np.flatnonzero(groups == g) for g in np.unique(groups)]
    rng = np.random.default_rng(seed)
    for _ in range(n_boot):
        yield np.concatenate([rng.choice(m, size=m.size, replace=True) for m in members])


def bootstrap_curve(model: CurveModel | str, n, err, groups=None, n_boot: int = 1000, seed: int = 0,
                    level: float = LEVEL) -> CurveBootstrap:
    """Fit, then refit `n_boot` times on trials resampled with replacement within each group.

    `groups` labels which trials are exchangeable; the default is the training-set size, so
    each fraction keeps its number of seeds and only the seeds are resampled. A resample
    with no valid fit is skipped and counted in `n_failed`; the intervals are percentiles
    over the rest. Raises RaysweepError if the points themselves cannot be fitted.
    """
    model = get_model(model) if isinstance(model, str) else model
    n, err = check_points(n, err)
    full = fit_curve(model, n, err)
    groups = n if groups is None else np.asarray(groups).ravel()
    if groups.shape != n.shape:
        raise RaysweepError(f"bootstrap: {groups.size} group labels for {n.size} points")
    rows, failed = [], 0
    for idx in resamples(groups, n_boot, seed):
        try:
            rows.append(fit_curve(model, n[idx], err[idx]).values)
        except RaysweepError:
            failed += 1
    if not rows:
        raise RaysweepError(f"bootstrap: none of the {n_boot} resamples could be fitted")
    return CurveBootstrap(fit=full, samples=np.array(rows), n_boot=n_boot, n_failed=failed, level=level)


def invert(model: CurveModel, params: dict, target: float) -> np.ndarray:
    """Training-set size where the curve first reaches `target` (inf: never). `params` values may
    be arrays of resamples. Closed form where the family has one, else a search along log n."""
    params = {k: np.asarray(v, dtype=float) for k, v in params.items()}  # float ** 0.5 of < 0 is complex
    if model.invert is not None:
        return np.asarray(model.invert(params, target), dtype=float)
    from scipy.optimize import brentq

    cols = [np.atleast_1d(np.asarray(params[p], dtype=float)) for p in model.params]
    grid = np.geomspace(1.0, 1e15, 601)
    out = np.full(cols[0].shape, np.inf)
    for i in range(out.size):
        p = [c[i] for c in cols]
        below = np.flatnonzero(model.predict(p, grid) <= target)
        if below.size == 0:
            continue
        j = below[0]
        if j == 0:
            out[i] = grid[0]
            continue
        f = lambda logn: math.log(float(model.predict(p, math.exp(logn)))) - math.log(target)  # noqa: E731
        out[i] = math.exp(brentq(f, math.log(grid[j - 1]), math.log(grid[j]), xtol=1e-12))
    return out if out.size > 1 or np.ndim(params[model.params[0]]) else out.reshape(())
