"""The figures of one sweep: scaling.png/.svg (error against training-set size, log-log, with the
fitted law, its band and the held-out check) and curves.png (learning curves per subset).

Matplotlib and seaborn are imported here only; the CLIs import this module when they draw.
"""

from __future__ import annotations

import io
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display, and safe in a worker or a container

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.ticker import FixedLocator, FuncFormatter, MaxNLocator, NullLocator  # noqa: E402

from analysis import results as R  # noqa: E402
from analysis.curvefit import CurveFit  # noqa: E402
from raysweep.io import atomic_write_bytes  # noqa: E402

NICE_TICKS = [0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08, 0.1, 0.12, 0.15, 0.2, 0.25,
              0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]


def label(metric: str) -> str:
    split, k = metric.split("_")[0], metric.split("_")[1][-1]
    return f"{'Test' if split == 'test' else 'Validation'} top-{k} error"


def companion(metric: str) -> str:
    """The same error on the other split: the test curve's validation twin and vice versa."""
    return metric.replace("test_", "val_") if metric.startswith("test_") else metric.replace("val_", "test_")


def log_ticks(ax, lo: float, hi: float) -> None:
    """Labelled ticks on a log error axis that may span only a few points of error."""
    ticks = [t for t in NICE_TICKS if lo <= t <= hi]
    if len(ticks) < 4:  # a narrow range: evenly stepped values read better than sparse decades
        ticks = [t for t in MaxNLocator(nbins=6, steps=[1, 2, 2.5, 5, 10]).tick_values(lo, hi) if lo <= t <= hi]
    ax.yaxis.set_major_locator(FixedLocator(ticks))
    ax.yaxis.set_minor_locator(NullLocator())
    ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{100 * y:.3g}%"))


def _mathlaw(fit: CurveFit) -> str:
    if fit.model.name not in ("pow2", "pow3"):
        return fit.formula()
    law = rf"{fit.a:.3g}\,n^{{-{fit.alpha:.3f}}}"
    return rf"$\mathrm{{err}}(n) = {law} + {fit.c:.3f}$" if fit.irreducible else rf"$\mathrm{{err}}(n) = {law}$"


def _ci_text(fit: CurveFit, boot, no_interval: str | None = None) -> str:
    """The parameters that carry the law's meaning, with their intervals: alpha and c for the
    power laws, every parameter for the other families."""
    names = [p for p in ("alpha", "c") if p in fit.model.params] if "alpha" in fit.model.params else list(
        fit.model.params)
    def num(x: float) -> str:
        # Errors and exponents are read to the third decimal; 3.3e-28 is a bound the fit sat on, 0.
        return f"{x:.3f}" if abs(x) < 1e3 else f"{x:.3g}"

    parts = []
    for p in names:
        sym = r"$\alpha$" if p == "alpha" else p
        text = f"{sym} = {num(getattr(fit, p))}"
        if boot is not None:
            lo, hi = boot.interval(p)
            text += f" [{num(lo)}, {num(hi)}]"
        elif no_interval:
            text += f" [{no_interval}]"
        parts.append(text)
    # Two per line: four parameters with intervals on one line would widen the figure past its axes.
    return "\n".join(", ".join(parts[i:i + 2]) for i in range(0, len(parts), 2))


def plot_scaling(exp: R.Experiment, used: pd.DataFrame, metric: str, result: dict, include_unlearned: bool):
    """Error against training images, log-log: seeds faint, means with 95% CI, the fit and its band."""
    fig, ax = plt.subplots(figsize=(7.0, 5.6))
    palette = sns.color_palette("colorblind")
    series = [(metric, palette[0], "o"), (companion(metric), palette[1], "s")]
    all_y, zero_seen = [], False
    for i, (m, color, marker) in enumerate(series):
        pts = used[["n_train", "fraction", m]].dropna()
        if pts.empty:
            continue
        dodge = 1.045 if i else 0.955  # keep the two splits apart at the same n; the fit owns n itself
        jitter = np.random.default_rng(i).uniform(-0.02, 0.02, len(pts))
        ax.scatter(pts["n_train"] * dodge * np.exp(jitter), pts[m], s=22, color=color, alpha=0.45,
                   marker=marker, linewidths=0, zorder=2)
        summ = R.per_fraction_summary(used, metrics=[m])
        yerr = np.vstack([summ[f"{m}_mean"] - summ[f"{m}_ci_low"], summ[f"{m}_ci_high"] - summ[f"{m}_mean"]])
        all_y += list(pts[m]) + list(summ[f"{m}_ci_high"].dropna())
        # A CI that reaches 0 (two seeds give wide t intervals) is clipped at the axis, but it
        # must not turn the log axis linear: only an observed error of 0 does that.
        all_y += [v for v in summ[f"{m}_ci_low"].dropna() if v > 0]
        zero_seen = zero_seen or bool((pts[m] <= 0).any())
        ax.errorbar(summ["n_train"] * dodge, summ[f"{m}_mean"], yerr=np.nan_to_num(yerr), color=color,
                    marker=marker, ms=6.5, mec="white", mew=0.8, lw=1.0 if i else 0, ls=":" if i else "none",
                    elinewidth=1.4, capsize=3, zorder=4,
                    label=f"{label(m)}: mean ± 95% CI over seeds (faint: each seed)")
    fit, boot = result.get("_fit"), result.get("_boot")
    n_all = used["n_train"].astype(float)
    if fit is not None:
        grid = np.geomspace(n_all.min() / 1.15, n_all.max() * 1.15, 200)
        if boot is not None:
            lo, hi = boot.predict_interval(grid)
            ax.fill_between(grid, lo, hi, color=palette[0], alpha=0.18, lw=0, zorder=1,
                            label=f"fit: 95% bootstrap band ({boot.n_ok} resamples of seeds)")
        ax.plot(grid, fit.predict(grid), color=palette[0], lw=2, zorder=3,
                label=f"fit ({fit.model.name}): {_mathlaw(fit)}\n{_ci_text(fit, boot, result.get('intervals_reason'))}")
    h = result.get("_holdout")
    if h is not None:
        hgrid = np.geomspace(n_all.min(), h.n_heldout, 100)
        ax.plot(hgrid, h.fit.predict(hgrid), color="0.3", lw=1.1, ls="--", zorder=3)
        ax.scatter([h.n_heldout], [h.predicted], marker="D", s=34, facecolor="white", edgecolor="0.2", lw=1.2,
                   zorder=5, label=f"held-out check (dashed): fit without n = {h.n_heldout:,.0f} predicts "
                                   f"{100 * h.predicted:.2f}% ({100 * h.rel_error:+.1f}%)")
    left = exp.trials[(exp.trials["excluded"] != "") & exp.trials[metric].notna()]
    if include_unlearned:
        left = left[left["excluded"] != "did not learn"]
    all_y = all_y or list(left[metric])  # nothing usable (a smoke sweep at chance): show what there is
    if all_y:
        lo, hi = min(all_y) / 1.12, min(1.0, max(all_y) * 1.12)
        # Left-out trials (e.g. stuck at chance) are shown, but must not squash the fitted range:
        # those beyond it sit on the top edge as carets.
        if not left.empty:
            y = left[metric].astype(float)
            above = y > hi
            why = ", ".join(f"{k} {v}" for v, k in left["excluded"].value_counts().items())
            txt = f"left out of the fit: {why}" + (f" (▲: above the axes, up to {100 * y.max():.0f}%)" if above.any() else "")
            if (~above).any():
                ax.scatter(left["n_train"][~above].astype(float), y[~above], marker="x", s=30, color="0.45",
                           zorder=6, label=txt)
            if above.any():
                ax.scatter(left["n_train"][above].astype(float), np.full(above.sum(), hi / 1.025), marker="^",
                           s=30, color="0.45", zorder=6, label=None if (~above).any() else txt)
        if lo > 0 and not zero_seen:
            ax.set_yscale("log", nonpositive="clip")
            ax.set_ylim(lo, hi)
            log_ticks(ax, lo, hi)
        else:  # an error of 0 (e.g. top-5 with <= 5 classes) has no place on a log axis
            top = max(hi, 0.01)
            ax.set_ylim(-0.04 * top, top)  # markers at 0 sit just above the frame, not cut by it
            ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{100 * y:.3g}%"))
        ax.set_xscale("log")
        sizes = sorted(set(exp.trials["n_train"].dropna().astype(int)))
        ax.xaxis.set_major_locator(FixedLocator(sizes))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:,.0f}"))
        ax.set_xlim(min(sizes) / 1.3, max(sizes) * 1.3)
    else:
        ax.text(0.5, 0.5, "no finished trial reported this metric", ha="center", va="center", transform=ax.transAxes)
    if fit is None:
        reason = result.get("no_fit_reason") or "no fit"
        ax.text(0.98, 0.97, textwrap.fill(f"No fit: {reason}", 60), transform=ax.transAxes, fontsize=9,
                color="0.25", va="top", ha="right")  # top right: empty when error falls with n
    ax.set_xlabel("Training images, n (log scale)")
    ax.set_ylabel(f"{label(metric).split(' ', 1)[1].capitalize()} ({ax.get_yscale()} scale)")
    ax.set_title(f"{exp.name}: {label(metric).lower()} vs. training-set size", loc="left")
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        # The measurements first, then the fit and its checks; below the axes, because inside
        # six entries would cover the points of a narrow error range.
        order = sorted(range(len(labels)), key=lambda j: (not labels[j].startswith(("Test", "Validation")), j))
        ax.legend([handles[j] for j in order], [labels[j] for j in order], loc="upper left",
                  bbox_to_anchor=(0.0, -0.17), fontsize=8.5, frameon=False, borderaxespad=0)
    fig.tight_layout()
    return fig


def plot_curves(exp: R.Experiment, used: pd.DataFrame, val_metric: str = "val_top5_error"):
    """Train loss and the validation error `val_metric` (the one that picked each trial's best
    epoch) by epoch: the largest subset per seed, then all subsets.

    Trials left out of the fit are drawn too (grey, dashed): a run stuck at chance is what
    these curves are for.
    """
    fig, axes = plt.subplots(2, 2, figsize=(13, 6.8), sharex="col", sharey="row")
    epochs = exp.epochs
    rows = [("train_loss", "Training loss"), (val_metric, label(val_metric) if "error" in val_metric
                                              else "Validation loss")]
    if epochs.empty:
        for ax in axes.flat:
            ax.text(0.5, 0.5, "no per-epoch results", ha="center", va="center", transform=ax.transAxes)
        return fig
    is_used = epochs["trial_id"].isin(used["trial_id"])
    sizes = sorted(epochs["n_train"].dropna().unique())
    largest = epochs[epochs["n_train"] == sizes[-1]]
    best = exp.trials.set_index("trial_id")["best_epoch"]
    colors = dict(zip(sizes, sns.color_palette("viridis_r", len(sizes))))
    seed_colors = sns.color_palette("deep")
    for r, (m, name) in enumerate(rows):
        ax = axes[r, 0]
        groups = list(largest.groupby(["seed", "trial_id"]))
        for i, ((seed, tid), g) in enumerate(groups):
            left = not used["trial_id"].eq(tid).any()
            ax.plot(g["epoch"], g[m], lw=1.4, ls="--" if left else "-", color=seed_colors[i % 10],
                    marker="o" if len(g) < 15 else None, ms=3, label=f"seed {seed}" + (" (left out)" if left else ""))
        for i, ((seed, tid), g) in enumerate(groups if r == 1 else []):
            b = best.get(tid)
            if not pd.isna(b) and (g["epoch"] == b).any():
                ax.scatter([b], g.loc[g["epoch"] == b, m], marker="*", s=90, color=seed_colors[i % 10],
                           edgecolor="black", lw=0.5, zorder=5, label="best epoch (tested)" if i == 0 else None)
        ax.set_ylabel(name)
        ax = axes[r, 1]
        for n in sizes:
            g = epochs[is_used & (epochs["n_train"] == n)].groupby("epoch")[m]
            if g.ngroups:
                mean = g.mean()
                ax.plot(mean.index, mean, color=colors[n], lw=1.6, label=f"n = {int(n):,}")
                ax.fill_between(mean.index, g.min(), g.max(), color=colors[n], alpha=0.15, lw=0)
            # Left-out runs one by one, dashed: a smoke sweep's runs at chance still show here.
            for j, (_, run) in enumerate(epochs[~is_used & (epochs["n_train"] == n)].groupby("trial_id")):
                ax.plot(run["epoch"], run[m], color=colors[n], lw=1.0, ls="--", alpha=0.8,
                        label=f"n = {int(n):,}, left out of the fit" if j == 0 else None)
    if "error" in val_metric:
        for ax in axes[1]:
            ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{100 * y:.0f}%"))
    axes[0, 0].set_title(f"Largest subset (n = {int(sizes[-1]):,}), each seed", loc="left")
    axes[0, 1].set_title("Every subset: mean over seeds (band: min–max)", loc="left")
    # The subsets' legend goes outside, right: inside it always covers some run's curve.
    # tight_layout leaves figure legends alone, so the rect below keeps the panels' width.
    fig.legend(*axes[0, 1].get_legend_handles_labels(), fontsize=8.5, loc="upper left",
               bbox_to_anchor=(0.8, 0.93), title="training images", title_fontsize=8.5)
    axes[1, 0].legend(fontsize=8.5, loc="best")
    for ax in axes[1]:
        ax.set_xlabel("Epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(f"{exp.name}: learning curves", x=0.01, ha="left")
    fig.tight_layout(rect=(0, 0, 0.8, 1))
    return fig


def save_fig(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format=path.suffix[1:], dpi=200, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())


def draw_all(exp: R.Experiment, used: pd.DataFrame, metric: str, result: dict, include_unlearned: bool,
             val_metric: str, out: Path) -> None:
    """scaling.png, scaling.svg and curves.png into `out`, in the house theme (kept inside this call)."""
    with plt.rc_context():  # the seaborn theme stays inside this command, not in a caller's session
        sns.set_theme(context="paper", style="whitegrid", font_scale=1.25)
        fig = plot_scaling(exp, used, metric, result, include_unlearned)
        save_fig(fig, out / "scaling.png")
        save_fig(fig, out / "scaling.svg")
        plt.close(fig)
        fig = plot_curves(exp, used, val_metric)
        save_fig(fig, out / "curves.png")
        plt.close(fig)
