"""The scaling law the report fits by default, err(n) = a * n^(-alpha) + c (the curve family
pow3; pow2 without c), with bootstrap intervals over seeds, the training-set size that reaches
a target error, and the held-out check.

The fitting itself lives in `analysis.curvefit` (the families in `analysis.curves`); this module
is the power-law face of it, and turns any fitted curve into the size that reaches a target.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from analysis.curvefit import LEVEL, CurveBootstrap, CurveFit, _interval, bootstrap_curve, fit_curve, invert
from analysis.extrapolation import Extrapolation, extrapolate
from raysweep.errors import RaysweepError

__all__ = ["LEVEL", "SizeEstimate", "fit_power_law", "bootstrap_fit", "holdout_check", "size_for_error"]


def _law(irreducible: bool) -> str:
    return "pow3" if irreducible else "pow2"


def fit_power_law(n, err, irreducible: bool = True) -> CurveFit:
    """Fit err(n) = a * n^(-alpha) + c to points (n_i, err_i), one point per trial.

    The fit minimizes squared residuals of log(err), so every size counts alike whatever its
    error level. With `irreducible=False`, c = 0 and the fit is exactly the least-squares
    line through (log n, log err). Otherwise c is bounded to [0, min(err)) and the
    optimizer starts from that line. Raises RaysweepError on fewer than 3 distinct sizes,
    errors outside (0, 1], non-finite values, errors that do not vary, or (with c) errors
    that do not fall with size.
    """
    return fit_curve(_law(irreducible), n, err)


def bootstrap_fit(n, err, groups=None, n_boot: int = 1000, seed: int = 0,
                  irreducible: bool = True, level: float = LEVEL) -> CurveBootstrap:
    """The power law, refitted on `n_boot` resamples of the seeds within each size
    (see `analysis.curvefit.bootstrap_curve`)."""
    return bootstrap_curve(_law(irreducible), n, err, groups=groups, n_boot=n_boot, seed=seed, level=level)


def holdout_check(n, err, irreducible: bool = True) -> Extrapolation:
    """Fit on every size but the largest, predict the largest, compare with its mean error.

    Needs 4 distinct sizes, so that 3 remain for the fit.
    """
    return extrapolate(_law(irreducible), n, err, held=1)


@dataclass(frozen=True)
class SizeEstimate:
    """Training-set size at which the curve reaches `target` error (inf: never, e.g. target <= c)."""

    target: float
    n: float
    interval: tuple[float, float] | None = None  # bootstrap percentiles; inf = unreachable
    unreachable_share: float = 0.0  # share of resamples that never reach the target

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


def size_for_error(fit: CurveFit | CurveBootstrap, target: float) -> SizeEstimate:
    """Invert the curve (for the power law, n = (a / (target - c))^(1/alpha)). Pass a bootstrap
    to get an interval."""
    if not 0 < target <= 1:
        raise RaysweepError(f"target error {target!r} must lie in (0, 1]")
    point = fit.fit if isinstance(fit, CurveBootstrap) else fit
    n = float(invert(point.model, point.params | point.model.fixed, target))
    if not isinstance(fit, CurveBootstrap):
        return SizeEstimate(target=target, n=n)
    model = point.model
    samples = invert(model, {p: getattr(fit, p) for p in (*model.params, *model.fixed)}, target)
    return SizeEstimate(target=target, n=n, interval=_interval(samples, fit.level),
                        unreachable_share=float(np.mean(np.isinf(samples))))
