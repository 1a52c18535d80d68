"""The report judges its own evidence: plain warnings, each with the threshold that raised it,
for a law that its trials cannot support (issue 10, section 5).

Pure pandas/numpy on the tables of `analysis.results` and the fit of `analysis.plot_scaling`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from analysis.extrapolation import CLEARLY_FACTOR, CLEARLY_MIN_GAIN
from analysis.joint import FLAT_POINTS

# The thresholds, stated in every message they produce.
HOLDOUT_POINTS = 0.02  # held-out prediction off by more than 2 points of error
UNDERTRAINED_SHARE = 0.25  # best epoch = last epoch in at least a quarter of the capped trials
EXTRA_SIZES = 2  # sizes beyond the law's parameter count (3 parameters: at least 5 sizes)
MIN_SPAN = 8.0  # largest / smallest size: at least three doublings
MIN_SEEDS = 3  # seeds per size behind a bootstrap interval
STEPS_RATIO = 2.0  # optimizer steps, most / fewest, across sizes
ALPHA_CI_WIDTH = 1.0  # alpha's 95% CI at most as wide as alpha itself
# A trial stopped early while its training loss still fell this fast (nats per epoch, the stop
# rule's least-squares slope: the trial's `train_loss_slope`): it may have been stopped while learning.
STILL_FALLING_SLOPE = 0.02
# What an interval reads where every size has a single seed: resampling one seed gives the same
# points every time, so a bootstrap interval would have zero width and mean nothing.
ONE_SEED = "n/a (1 seed)"


def one_seed(used: pd.DataFrame) -> bool:
    """True when no size has two seeds to resample (no interval can be drawn)."""
    return not used.empty and int(used.groupby("fraction").size().max()) <= 1


@dataclass(frozen=True)
class Finding:
    code: str
    message: str

    def to_dict(self) -> dict:
        return {"code": self.code, "message": self.message}


def checks() -> str:
    """The checks and their thresholds, in one sentence (what a report without warnings passed)."""
    return (f"held-out miss over ±{100 * HOLDOUT_POINTS:g} points; best epoch = last epoch in "
            f"{UNDERTRAINED_SHARE:.0%} or more of the trials not stopped early; fewer sizes than the law's "
            f"parameters + {EXTRA_SIZES} or a span under {MIN_SPAN:g}x; fewer than {MIN_SEEDS} seeds at a size; "
            f"optimizer steps over {STEPS_RATIO:g}x apart while trials hit their epoch cap; trials stopped "
            f"early with the training loss still falling over {STILL_FALLING_SLOPE:g} nats/epoch; alpha's 95% CI "
            f"wider than alpha; c at its bound; another curve family extrapolating clearly better")


def _capped(trials: pd.DataFrame) -> pd.Series:
    """Trials that ended at their epoch cap rather than by early stopping (older experiments
    do not say: they had no early stopping, so every trial ran to its cap)."""
    if "stopped_early" not in trials:
        return pd.Series(True, index=trials.index)
    return trials["stopped_early"].map(lambda v: not (isinstance(v, (bool, np.bool_)) and bool(v)))


def trial_steps(trials: pd.DataFrame, config: dict | None) -> pd.Series | None:
    """Optimizer steps per trial: reported (`steps`), else epochs x batches per epoch from the
    sweep's batch size; None when neither is known."""
    if "steps" in trials and trials["steps"].notna().all():
        return trials["steps"].astype(float)
    batch = ((config or {}).get("train") or {}).get("batch_size")
    if not batch or "epochs" not in trials or trials["epochs"].isna().any():
        return None
    return trials["epochs"].astype(float) * np.ceil(trials["n_train"].astype(float) / batch)


def judge(used: pd.DataFrame, result: dict, config: dict | None = None) -> list[Finding]:
    """Every warning the used trials and the fit earn (see the thresholds above)."""
    out: list[Finding] = []
    fit, boot, hold = result.get("_fit"), result.get("_boot"), result.get("_holdout")
    if hold is not None and abs(hold.abs_error) > HOLDOUT_POINTS:
        out.append(Finding("holdout_miss", (
            f"held-out check missed: the law fitted without n = {hold.n_heldout:,.0f} predicts "
            f"{100 * hold.predicted:.2f}% there, the trials measured {100 * hold.observed:.2f}% "
            f"({100 * hold.abs_error:+.2f} points; threshold ±{100 * HOLDOUT_POINTS:g} points): "
            "do not trust this law beyond the sizes measured")))
    if not used.empty and {"best_epoch", "epochs"} <= set(used):
        capped = used[_capped(used) & used["best_epoch"].notna() & used["epochs"].notna()]
        last = capped[capped["best_epoch"].astype(int) == capped["epochs"].astype(int)]
        if len(capped) and len(last) >= max(1, math.ceil(UNDERTRAINED_SHARE * len(capped))):
            out.append(Finding("undertrained", (
                f"best epoch is the last one in {len(last)}/{len(capped)} trials that were not "
                f"stopped early (threshold: {UNDERTRAINED_SHARE:.0%} of them): those models were still "
                "improving when training ended; train longer, or until early stopping ends them "
                "(train.patience)")))
    if not used.empty and "train_loss_slope" in used and "stopped_early" in used:
        early = used[~_capped(used) & used["train_loss_slope"].notna()]
        falling = early[early["train_loss_slope"].astype(float) > STILL_FALLING_SLOPE]
        if len(falling):
            where = ", ".join(f"{int(c)} at n = {int(n_):,}" for n_, c in falling.groupby("n_train").size().items())
            out.append(Finding("stopped_while_falling", (
                f"{len(falling)} trial(s) stopped early while their training loss still fell faster than "
                f"{STILL_FALLING_SLOPE:g} nats/epoch ({where}): they may have been stopped while still learning, "
                "which biases the slope; raise train.patience, or set train.stop_loss_slope")))
    k = fit.model.k if fit is not None else 3
    sizes = np.unique(used["n_train"].dropna().astype(float)) if not used.empty else np.array([])
    if sizes.size:
        span = sizes.max() / sizes.min()
        if sizes.size < k + EXTRA_SIZES or span < MIN_SPAN:
            out.append(Finding("few_sizes", (
                f"too little data for {k} parameters: {sizes.size} sizes spanning {span:.1f}x (thresholds: at "
                f"least {k + EXTRA_SIZES} sizes and a span of {MIN_SPAN:g}x): the parameters trade off "
                "against each other and their intervals mean little")))
        seeds = used.groupby("n_train").size()
        if seeds.min() < MIN_SEEDS:
            few = seeds[seeds < MIN_SEEDS]
            where = ", ".join(f"{int(v)} at n = {int(n_):,}" for n_, v in few.items())
            why = (f"with one seed at every size there is nothing to resample, so no interval ({ONE_SEED})"
                   if seeds.max() == 1 else "a bootstrap over so few seeds understates the spread")
            out.append(Finding("few_seeds", f"intervals from fewer than {MIN_SEEDS} seeds ({where}): {why}; add seeds"))
    steps = trial_steps(used, config) if not used.empty else None
    if steps is not None and sizes.size >= 2:
        per_size = steps.groupby(used["n_train"].astype(float)).median()
        ratio = per_size.max() / per_size.min()
        capped = _capped(used)
        if ratio > STEPS_RATIO and capped.any():
            hi_n, lo_n = per_size.idxmax(), per_size.idxmin()
            out.append(Finding("unequal_optimisation", (
                f"n = {hi_n:,.0f} had {ratio:.1f}x the optimizer steps of n = {lo_n:,.0f} "
                f"(threshold {STEPS_RATIO:g}x) while {int(capped.sum())}/{len(used)} trials ended at their "
                "epoch cap rather than converging: part of the slope may be optimisation, not data; "
                "use train.budget=steps or early stopping")))
    if boot is not None and "alpha" in fit.model.params:
        lo, hi = boot.interval("alpha")
        if hi - lo > ALPHA_CI_WIDTH * abs(fit.alpha):
            out.append(Finding("wide_alpha_ci", (
                f"alpha's 95% CI ({lo:.3f} – {hi:.3f}) is wider than alpha itself ({fit.alpha:.3f}; threshold: "
                "a width of at most alpha): the exponent is not determined by these trials")))
    if fit is not None and fit.c_at_bound:
        out.append(Finding("c_at_bound", (
            f"c is pinned at its bound, the smallest measured error ({100 * fit.c:.2f}%): the data do not "
            "bound the plateau, and the law's other parameters trade off against it")))
    better = result.get("_better")
    if better is not None:
        score, theirs, ours = better
        out.append(Finding("better_model", (
            f"{score.name} extrapolates clearly better than the reported law: held-out error "
            f"{100 * theirs:.2f} against {100 * ours:.2f} points (threshold: at most 1/{CLEARLY_FACTOR:g} of it, "
            f"and {100 * CLEARLY_MIN_GAIN:g} point less); see the model comparison, or refit with "
            f"--model {score.name}")))
    return out


# The joint law over n and model size (analysis.joint), on a grid of two or more widths.
JOINT_MIN_WIDTHS = 3  # the width term has two parameters (b, beta): two widths give one difference
JOINT_MIN_SIZES = 3  # sizes at every width, so each width's own curve is seen, not only its level
JOINT_HOLDOUT_POINTS = HOLDOUT_POINTS  # mean held-out miss over a check's cells
EXPONENT_CI_WIDTH = ALPHA_CI_WIDTH  # alpha's and beta's 95% CI at most as wide as the exponent
JOINT_FLAT_POINTS = FLAT_POINTS  # a term flatter than this across the grid sets no frontier (analysis.joint)


def joint_checks() -> str:
    return (f"joint law: fewer than {JOINT_MIN_WIDTHS} widths, {JOINT_MIN_SIZES} sizes at a width or {MIN_SEEDS} "
            f"seeds in a cell; a held-out mean miss over ±{100 * JOINT_HOLDOUT_POINTS:g} points; an exponent's 95% "
            f"CI wider than the exponent; a parameter at its bound; a term moving the error by under "
            f"{100 * JOINT_FLAT_POINTS:g} points across the grid (no frontier)")


def judge_joint(joint: dict, used: pd.DataFrame) -> list[Finding]:
    """The joint law's warnings (thresholds above); codes start with `joint_`."""
    out: list[Finding] = []
    fit, boot = joint.get("_fit"), joint.get("_boot")
    if fit is None:
        return [Finding("joint_no_fit", f"no joint law: {joint.get('no_fit_reason')}")]
    widths = joint.get("widths") or []
    if len(widths) < JOINT_MIN_WIDTHS:
        out.append(Finding("joint_few_widths", (
            f"{len(widths)} widths (threshold: at least {JOINT_MIN_WIDTHS}): the width term b·m^(-beta) has two "
            "parameters and two widths give one difference, so b, beta and c trade off; add a width")))
    per = used.groupby("width")["n_train"].nunique()
    thin = per[per < JOINT_MIN_SIZES]
    if len(thin):
        where = ", ".join(f"width {w:g}: {k}" for w, k in thin.items())
        out.append(Finding("joint_few_sizes", (
            f"fewer than {JOINT_MIN_SIZES} training-set sizes at some widths ({where}): those widths pin "
            "only the law's level, not its slope")))
    seeds = used.groupby(["width", "n_train"]).size()
    if seeds.min() < MIN_SEEDS:
        out.append(Finding("joint_few_seeds", (
            f"the joint law's intervals come from {seeds.min()} seed(s) in some (n, width) cells (threshold: at "
            f"least {MIN_SEEDS}): a bootstrap over so few seeds understates the spread; add seeds")))
    for axis, what in (("n", "the largest n"), ("m", "the widest model")):
        h = joint.get(f"_holdout_{axis}")
        if h is not None and h.mean_abs_error > JOINT_HOLDOUT_POINTS:
            out.append(Finding(f"joint_holdout_miss_{axis}", (
                f"the joint law fitted without {what} misses it by {100 * h.mean_abs_error:.2f} points on "
                f"average (worst {100 * h.max_abs_error:.2f}; threshold {100 * JOINT_HOLDOUT_POINTS:g} points): "
                f"do not trust its predictions beyond {what} measured")))
    if boot is not None:
        for p, sym in (("alpha", "alpha"), ("beta", "beta")):
            lo, hi = boot.interval(p)
            value = getattr(fit, p)
            if hi - lo > EXPONENT_CI_WIDTH * abs(value):
                out.append(Finding(f"joint_wide_{p}_ci", (
                    f"the joint law's {sym} has a 95% CI ({lo:.3f} – {hi:.3f}) wider than {sym} itself "
                    f"({value:.3f}; threshold: a width of at most {sym}): the exponent is not determined")))
    if joint.get("frontier_reason"):
        out.append(Finding("joint_no_frontier", (
            f"no compute frontier: {joint['frontier_reason']}; the best width on the grid is all these trials "
            "can say")))
    if fit.at_bound:
        out.append(Finding("joint_at_bound", (
            f"the joint fit left {', '.join(fit.at_bound)} on a bound (exponents within (0, 3], c below the "
            "smallest error): the data do not determine those parameters")))
    return out
