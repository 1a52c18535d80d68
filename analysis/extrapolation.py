"""Judging curve families by extrapolation: fit without the largest size(s), predict them; the
comparison of every family on one sweep's trials; and the rule for "clearly better".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from analysis.curvefit import CurveFit, fit_curve
from analysis.curves import MODEL_NAMES, CurveModel, check_points, get_model
from raysweep.errors import RaysweepError

# "Clearly better" extrapolation: another family's held-out error is at most half the law's and
# at least one point of error smaller (a factor alone would flag 0.2 vs 0.4 points: noise).
CLEARLY_FACTOR = 2.0
CLEARLY_MIN_GAIN = 0.01


class HeldOutMisses:
    """What a held-out check's predictions missed by (`predicted_each`, `observed_each`): one
    home for the one-axis checks here and the joint law's (analysis.joint)."""

    @property
    def errors(self) -> np.ndarray:
        """predicted - observed at each held-out point, in error units."""
        return np.array(self.predicted_each) - np.array(self.observed_each)

    @property
    def mean_abs_error(self) -> float:
        return float(np.mean(np.abs(self.errors)))


@dataclass(frozen=True)
class Extrapolation(HeldOutMisses):
    """The curve fitted without the `held` largest sizes, judged on how well it predicts them.

    `sizes`, `observed` (mean error over each held-out size's trials) and `predicted` run from
    the smallest held-out size to the largest; the scalar properties describe the largest."""

    held: int
    sizes: tuple[float, ...]
    observed_each: tuple[float, ...]
    predicted_each: tuple[float, ...]
    fit: CurveFit

    @property
    def n_heldout(self) -> float:
        return self.sizes[-1]

    @property
    def observed(self) -> float:
        return self.observed_each[-1]

    @property
    def predicted(self) -> float:
        return self.predicted_each[-1]

    @property
    def abs_error(self) -> float:
        return float(self.errors[-1])

    @property
    def rel_error(self) -> float:
        return self.abs_error / self.observed

    def to_dict(self) -> dict:
        return {"held": self.held, "sizes": list(self.sizes), "observed_each": list(self.observed_each),
                "predicted_each": list(self.predicted_each), "mean_abs_error": self.mean_abs_error,
                "n_heldout": self.n_heldout, "observed": self.observed, "predicted": self.predicted,
                "abs_error": self.abs_error, "rel_error": self.rel_error, "fit": self.fit.to_dict()}


def extrapolate(model: CurveModel | str, n, err, held: int = 1) -> Extrapolation:
    """Fit on every size but the `held` largest, predict those, compare with their mean errors."""
    model = get_model(model) if isinstance(model, str) else model
    n, err = check_points(n, err)
    sizes = np.unique(n)
    need = max(model.k, 3) + held
    if sizes.size < need:
        what = "the largest" if held == 1 else f"the {held} largest"
        raise RaysweepError(
            f"held-out check needs at least {need} distinct training-set sizes ({need - held} to fit, "
            f"{what} to predict), got {sizes.size}"
        )
    out = sizes[-held:]
    keep = n < out[0]
    fit = fit_curve(model, n[keep], err[keep])
    return Extrapolation(held=held, sizes=tuple(float(s) for s in out),
                         observed_each=tuple(float(err[n == s].mean()) for s in out),
                         predicted_each=tuple(float(v) for v in fit.predict(out)), fit=fit)


@dataclass(frozen=True)
class ModelScore:
    """One row of the model comparison: the fit to all points and its extrapolations."""

    name: str
    fit: CurveFit | None
    extrapolations: tuple[Extrapolation, ...] = ()
    reason: str | None = None  # why there is no fit, or why an extrapolation is missing

    def extrapolation_error(self, helds: Sequence[int] | None = None) -> float | None:
        """Mean absolute held-out error over the extrapolations (optionally only those `helds`)."""
        errs = [e.mean_abs_error for e in self.extrapolations if helds is None or e.held in helds]
        return float(np.mean(errs)) if errs else None

    def to_dict(self) -> dict:
        fit = self.fit
        return {"name": self.name, "params": fit.params if fit else None,
                "formula": fit.formula() if fit else None,
                "rmse_log": fit.rmse_log if fit else None, "aic": fit.aic if fit else None,
                "bic": fit.bic if fit else None, "extrapolation_error": self.extrapolation_error(),
                "extrapolations": [e.to_dict() | {"fit": None} for e in self.extrapolations],
                "reason": self.reason}


def compare_models(n, err, names: Sequence[str] = tuple(MODEL_NAMES), helds: Sequence[int] = (1, 2)
                   ) -> list[ModelScore]:
    """Fit every model; extrapolate from all but the largest size and, with >= 5 sizes, from all
    but the two largest (`helds`; () skips extrapolation). Sorted by BIC (fitted models first),
    so the top row is the model the data support best for its number of parameters."""
    n, err = check_points(n, err)
    n_sizes = np.unique(n).size
    scores = []
    for name in names:
        model = get_model(name)
        try:
            fit = fit_curve(model, n, err)
        except RaysweepError as e:
            scores.append(ModelScore(name=name, fit=None, reason=str(e)))
            continue
        extra, missing = [], []
        for held in (h for h in helds if h == 1 or n_sizes >= 5):
            try:
                extra.append(extrapolate(model, n, err, held))
            except RaysweepError as e:
                missing.append(str(e))
        scores.append(ModelScore(name=name, fit=fit, extrapolations=tuple(extra),
                                 reason="; ".join(missing) or None))
    return sorted(scores, key=lambda s: (s.fit is None, s.fit.bic if s.fit else 0.0))


def clearly_better(scores: Sequence[ModelScore], law: str) -> tuple[ModelScore, float, float] | None:
    """The model that extrapolates clearly better than `law`, if any: compared on the held-out
    settings both have, its error must be at most 1/CLEARLY_FACTOR of the law's and at least
    CLEARLY_MIN_GAIN smaller. Returns (score, its error, the law's error) for the best such model."""
    mine = next((s for s in scores if s.name == law), None)
    if mine is None or not mine.extrapolations:
        return None
    best = None
    for s in scores:
        if s.name == law or not s.extrapolations:
            continue
        common = {e.held for e in s.extrapolations} & {e.held for e in mine.extrapolations}
        if not common:
            continue
        theirs, ours = s.extrapolation_error(common), mine.extrapolation_error(common)
        if theirs * CLEARLY_FACTOR <= ours and ours - theirs >= CLEARLY_MIN_GAIN:
            if best is None or theirs < best[1]:
                best = (s, theirs, ours)
    return best
