"""Power-law scaling fits, err(n) = a * n^(-alpha) + c, with bootstrap intervals over seeds.

Pure numpy/scipy: the fits know nothing of Ray or of experiment directories.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from scipy.optimize import least_squares

from raysweep.errors import RaysweepError

LEVEL = 0.95


@dataclass(frozen=True)
class PowerLawFit:
    """A fitted err(n) = a * n^(-alpha) + c. `c` is 0 for the plain (irreducible=False) fit.

    Goodness of fit is measured in log space, where the fit is made: `rmse_log` is the
    root-mean-square of log(predicted) - log(observed), `r2_log` the share of the variance
    of log(err) explained. `rmse` is the same residual in error units.
    """

    a: float
    alpha: float
    c: float
    irreducible: bool
    n_points: int
    n_sizes: int
    rmse_log: float
    r2_log: float
    rmse: float
    c_at_bound: bool = False  # c pinned to min(err): the data do not bound the plateau

    def predict(self, n: float | Sequence[float] | np.ndarray) -> np.ndarray:
        n = np.asarray(n, dtype=float)
        return self.a * n ** (-self.alpha) + self.c

    def formula(self, digits: int = 3) -> str:
        law = f"{self.a:.{digits}g}·n^(-{self.alpha:.{digits}f})"
        return f"err(n) = {law} + {self.c:.{digits}f}" if self.irreducible else f"err(n) = {law}"

    def to_dict(self) -> dict:
        return {
            "a": self.a, "alpha": self.alpha, "c": self.c, "irreducible": self.irreducible,
            "n_points": self.n_points, "n_sizes": self.n_sizes, "rmse_log": self.rmse_log,
            "r2_log": self.r2_log, "rmse": self.rmse, "c_at_bound": self.c_at_bound,
            "formula": self.formula(),
        }


def check_points(n, err) -> tuple[np.ndarray, np.ndarray]:
    """Validate (n, err) for a power-law fit; return them as float arrays or raise RaysweepError."""
    n = np.asarray(n, dtype=float).ravel()
    err = np.asarray(err, dtype=float).ravel()
    if n.shape != err.shape:
        raise RaysweepError(f"power-law fit: {n.size} sizes but {err.size} errors")
    for name, values in (("training-set size", n), ("error", err)):
        bad = np.flatnonzero(~np.isfinite(values))
        if bad.size:
            raise RaysweepError(
                f"power-law fit: {name} at point {bad[0]} is {values[bad[0]]} "
                f"({bad.size} non-finite value(s)); drop or fix those trials first"
            )
    if (n <= 0).any():
        i = int(np.flatnonzero(n <= 0)[0])
        raise RaysweepError(f"power-law fit: training-set size at point {i} is {n[i]:g}; sizes must be positive")
    if ((err <= 0) | (err > 1)).any():
        i = int(np.flatnonzero((err <= 0) | (err > 1))[0])
        raise RaysweepError(
            f"power-law fit: error at point {i} (n={n[i]:g}) is {err[i]:g}; errors must lie in (0, 1] "
            "(a fraction; 0 has no logarithm)"
        )
    sizes = np.unique(n)
    if sizes.size < 3:
        listed = ", ".join(f"{s:g}" for s in sizes)
        raise RaysweepError(
            f"power-law fit needs at least 3 distinct training-set sizes, got {sizes.size} ({listed}): "
            "with fewer, a, alpha and c are not determined"
        )
    if np.ptp(err) == 0:
        raise RaysweepError(
            f"power-law fit: all {err.size} errors are equal ({err[0]:g}), so the error does not change "
            "with training-set size and there is no power law to fit (a model stuck at chance does this)"
        )
    return n, err


def _loglog_line(n: np.ndarray, err: np.ndarray) -> tuple[float, float]:
    """Least-squares line log(err) = log(a) - alpha * log(n); returns (log a, alpha)."""
    slope, intercept = np.polyfit(np.log(n), np.log(err), 1)
    return float(intercept), float(-slope)


def _fit_irreducible(n: np.ndarray, err: np.ndarray) -> tuple[float, float, float]:
    """Nonlinear least squares on log residuals over (log a, alpha, c), c in [0, min(err))."""
    logn, logerr = np.log(n), np.log(err)
    c_hi = float(err.min()) * (1 - 1e-9)

    def residuals(p):
        return np.log(np.exp(p[0] - p[1] * logn) + p[2]) - logerr

    def jacobian(p):
        pw = np.exp(p[0] - p[1] * logn)
        model = pw + p[2]
        return np.column_stack([pw / model, -logn * pw / model, 1.0 / model])

    best = None
    # The log-log line is the c = 0 start; a second start near the plateau keeps the optimizer
    # from stopping at c = 0 when the curve bends (on 300 random laws these two starts found
    # the best of three starts every time).
    for share in (0.0, 0.9):
        c0 = share * c_hi
        log_a0, alpha0 = _loglog_line(n, err - c0)
        x0 = np.array([log_a0, max(alpha0, 1e-6), c0])
        res = least_squares(residuals, x0, jac=jacobian, bounds=([-np.inf, 0.0, 0.0], [np.inf, np.inf, c_hi]),
                            method="trf", x_scale="jac", xtol=1e-13, ftol=1e-13, gtol=1e-13, max_nfev=2000)
        if best is None or res.cost < best.cost:
            best = res
    log_a, alpha, c = best.x
    return math.exp(log_a), float(alpha), float(c)


def fit_power_law(n, err, irreducible: bool = True) -> PowerLawFit:
    """Fit err(n) = a * n^(-alpha) + c to points (n_i, err_i), one point per trial.

    The fit minimizes squared residuals of log(err), so every size counts alike whatever its
    error level. With `irreducible=False`, c = 0 and the fit is exactly the least-squares
    line through (log n, log err). Otherwise c is bounded to [0, min(err)) and the
    optimizer starts from that line. Raises RaysweepError on fewer than 3 distinct sizes,
    errors outside (0, 1], non-finite values, errors that do not vary, or (with c) errors
    that do not fall with size.
    """
    n, err = check_points(n, err)
    log_a, alpha = _loglog_line(n, err)
    if irreducible:
        if alpha <= 0:
            raise RaysweepError(
                f"power-law fit: the error does not fall with training-set size (log-log slope "
                f"{-alpha:+.3g}); there is no decreasing law a*n^(-alpha) + c to fit"
            )
        a, alpha, c = _fit_irreducible(n, err)
    else:
        a, c = math.exp(log_a), 0.0
    pred = a * n ** (-alpha) + c
    resid = np.log(pred) - np.log(err)
    ss_tot = float(np.sum((np.log(err) - np.log(err).mean()) ** 2))
    return PowerLawFit(
        a=a, alpha=alpha, c=c, irreducible=irreducible, n_points=int(n.size), n_sizes=int(np.unique(n).size),
        rmse_log=float(np.sqrt(np.mean(resid**2))), r2_log=1.0 - float(np.sum(resid**2)) / ss_tot,
        rmse=float(np.sqrt(np.mean((pred - err) ** 2))),
        c_at_bound=bool(irreducible and c >= float(err.min()) * (1 - 1e-6)),
    )


def _interval(samples: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    # inverted_cdf picks observed samples, so an infinite sample (unreachable) stays inf, not NaN.
    q = np.quantile(samples, [(1 - level) / 2, (1 + level) / 2], method="inverted_cdf")
    return float(q[0]), float(q[1])


@dataclass(frozen=True)
class BootstrapFit:
    """The fit to all points, and the fits to `n_ok` bootstrap resamples of the trials."""

    fit: PowerLawFit
    a: np.ndarray = field(repr=False)
    alpha: np.ndarray = field(repr=False)
    c: np.ndarray = field(repr=False)
    n_boot: int
    n_failed: int  # resamples with no fit (e.g. every resampled error equal)
    level: float = LEVEL

    @property
    def n_ok(self) -> int:
        return int(self.alpha.size)

    def interval(self, param: str) -> tuple[float, float]:
        """Percentile interval of `a`, `alpha` or `c` over the resamples."""
        return _interval(getattr(self, param), self.level)

    def predict_interval(self, n) -> tuple[np.ndarray, np.ndarray]:
        """Pointwise percentile band of the predicted error at sizes `n`."""
        n = np.atleast_1d(np.asarray(n, dtype=float))
        preds = self.a[:, None] * n[None, :] ** (-self.alpha[:, None]) + self.c[:, None]
        lo, hi = np.quantile(preds, [(1 - self.level) / 2, (1 + self.level) / 2], axis=0)
        return lo, hi

    def to_dict(self) -> dict:
        out = {"level": self.level, "n_boot": self.n_boot, "n_failed": self.n_failed}
        for p in ("a", "alpha", "c"):
            out[f"{p}_ci"] = list(self.interval(p))
        return out


def bootstrap_fit(n, err, groups=None, n_boot: int = 1000, seed: int = 0,
                  irreducible: bool = True, level: float = LEVEL) -> BootstrapFit:
    """Fit, then refit `n_boot` times on trials resampled with replacement within each group.

    `groups` labels which trials are exchangeable; the default is the training-set size, so
    each fraction keeps its number of seeds and only the seeds are resampled. A resample
    with no valid fit is skipped and counted in `n_failed`; the intervals are percentiles
    over the rest. Raises RaysweepError if the points themselves cannot be fitted.
    """
    n, err = check_points(n, err)
    full = fit_power_law(n, err, irreducible)
    groups = n if groups is None else np.asarray(groups).ravel()
    if groups.shape != n.shape:
        raise RaysweepError(f"bootstrap: {groups.size} group labels for {n.size} points")
    members = [np.flatnonzero(groups == g) for g in np.unique(groups)]
    rng = np.random.default_rng(seed)
    params, failed = [], 0
    for _ in range(n_boot):
        idx = np.concatenate([rng.choice(m, size=m.size, replace=True) for m in members])
        try:
            f = fit_power_law(n[idx], err[idx], irreducible)
        except RaysweepError:
            failed += 1
            continue
        params.append((f.a, f.alpha, f.c))
    if not params:
        raise RaysweepError(f"bootstrap: none of the {n_boot} resamples could be fitted")
    a, alpha, c = (np.array(p) for p in zip(*params))
    return BootstrapFit(fit=full, a=a, alpha=alpha, c=c, n_boot=n_boot, n_failed=failed, level=level)


@dataclass(frozen=True)
class SizeEstimate:
    """Training-set size at which the law reaches `target` error (inf: never, since target <= c)."""

    target: float
    n: float
    interval: tuple[float, float] | None = None  # bootstrap percentiles; inf = unreachable
    unreachable_share: float = 0.0  # share of resamples whose plateau c is at or above target

    @property
    def reachable(self) -> bool:
        return math.isfinite(self.n)

    def describe(self) -> str:
        goal = f"error {100 * self.target:g}%"
        if not self.reachable:
            return f"{goal}: not reachable (at or below the irreducible error c)"
        text = f"{goal}: n ≈ {self.n:,.0f}"
        if self.interval is not None:
            lo, hi = self.interval
            text += f" (95% CI {lo:,.0f} – {'not reachable' if math.isinf(hi) else f'{hi:,.0f}'})"
        return text

    def to_dict(self) -> dict:
        def num(x):
            return x if math.isfinite(x) else None  # JSON has no inf; null = not reachable

        return {"target": self.target, "n": num(self.n), "reachable": self.reachable,
                "interval": None if self.interval is None else [num(x) for x in self.interval],
                "unreachable_share": self.unreachable_share}


def _size_at(a, alpha, c, target):
    a, alpha, c = (np.asarray(x, dtype=float) for x in (a, alpha, c))
    with np.errstate(divide="ignore", invalid="ignore"):
        n = (a / (target - c)) ** (1.0 / alpha)
    return np.where((target > c) & (alpha > 0), n, np.inf)


def size_for_error(fit: PowerLawFit | BootstrapFit, target: float) -> SizeEstimate:
    """Invert the law: n = (a / (target - c))^(1/alpha). Pass a BootstrapFit to get an interval."""
    if not 0 < target <= 1:
        raise RaysweepError(f"target error {target!r} must lie in (0, 1]")
    point = fit.fit if isinstance(fit, BootstrapFit) else fit
    n = float(_size_at(point.a, point.alpha, point.c, target))
    if not isinstance(fit, BootstrapFit):
        return SizeEstimate(target=target, n=n)
    samples = _size_at(fit.a, fit.alpha, fit.c, target)
    return SizeEstimate(target=target, n=n, interval=_interval(samples, fit.level),
                        unreachable_share=float(np.mean(np.isinf(samples))))


@dataclass(frozen=True)
class HoldoutCheck:
    """The law fitted without the largest size, judged on how well it predicts that size."""

    n_heldout: float
    observed: float  # mean error over the held-out size's trials
    predicted: float
    fit: PowerLawFit

    @property
    def abs_error(self) -> float:
        return self.predicted - self.observed

    @property
    def rel_error(self) -> float:
        return self.abs_error / self.observed

    def to_dict(self) -> dict:
        return {"n_heldout": self.n_heldout, "observed": self.observed, "predicted": self.predicted,
                "abs_error": self.abs_error, "rel_error": self.rel_error, "fit": self.fit.to_dict()}


def holdout_check(n, err, irreducible: bool = True) -> HoldoutCheck:
    """Fit on every size but the largest, predict the largest, compare with its mean error.

    Needs 4 distinct sizes, so that 3 remain for the fit.
    """
    n, err = check_points(n, err)
    largest = n.max()
    keep = n < largest
    if np.unique(n[keep]).size < 3:
        raise RaysweepError(
            f"held-out check needs at least 4 distinct training-set sizes (3 to fit, the largest to "
            f"predict), got {np.unique(n).size}"
        )
    fit = fit_power_law(n[keep], err[keep], irreducible)
    return HoldoutCheck(n_heldout=float(largest), observed=float(err[~keep].mean()),
                        predicted=float(fit.predict(largest)), fit=fit)
