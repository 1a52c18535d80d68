"""CLI: one sweep's scaling law: scaling.png/.svg, curves.png, summary.csv, fit.json, report.md.

    python -m analysis.plot_scaling EXPERIMENT_DIR [--out DIR] [--metric test_top5_error]
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
import textwrap
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display, and safe in a worker or a container

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.ticker import FixedLocator, FuncFormatter, MaxNLocator, NullLocator  # noqa: E402

from analysis import fit as F  # noqa: E402
from analysis import results as R  # noqa: E402
from raysweep.errors import RaysweepError, cli_entry  # noqa: E402
from raysweep.io import atomic_write_bytes, atomic_write_text  # noqa: E402

METRICS = ["test_top5_error", "test_top1_error", "val_top5_error", "val_top1_error"]
NICE_TICKS = [0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08, 0.1, 0.12, 0.15, 0.2, 0.25,
              0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]


def label(metric: str) -> str:
    split, k = metric.split("_")[0], metric.split("_")[1][-1]
    return f"{'Test' if split == 'test' else 'Validation'} top-{k} error"


def companion(metric: str) -> str:
    """The same error on the other split: the test curve's validation twin and vice versa."""
    return metric.replace("test_", "val_") if metric.startswith("test_") else metric.replace("val_", "test_")


def analyse(used: pd.DataFrame, metric: str, targets: list[float], n_boot: int, seed: int = 0) -> dict:
    """Fit the law to the used trials; every part that cannot be computed says why instead."""
    n, err, groups = used["n_train"].to_numpy(float), used[metric].to_numpy(float), used["fraction"].to_numpy()
    out: dict = {"metric": metric, "fit": None, "no_fit_reason": None, "intervals": None, "plain_fit": None,
                 "holdout": None, "holdout_reason": None, "targets": [], "bootstrap_seed": seed}
    if used.empty:
        out["no_fit_reason"] = "no usable trials: every trial was left out of the fit"
        return out
    try:
        boot = F.bootstrap_fit(n, err, groups, n_boot=n_boot, seed=seed) if n_boot > 0 else None
        fit = boot.fit if boot else F.fit_power_law(n, err)
    except RaysweepError as e:
        out["no_fit_reason"] = str(e)
        return out
    out.update(fit=fit.to_dict(), intervals=boot.to_dict() if boot else None,
               plain_fit=F.fit_power_law(n, err, irreducible=False).to_dict())
    out["_fit"], out["_boot"] = fit, boot
    try:
        out["_holdout"] = F.holdout_check(n, err)
        out["holdout"] = out["_holdout"].to_dict()
    except RaysweepError as e:
        out["holdout_reason"] = str(e)
    out["_targets"] = [F.size_for_error(boot or fit, t) for t in targets]
    out["targets"] = [s.to_dict() for s in out["_targets"]]
    return out


def _log_ticks(ax, lo: float, hi: float) -> None:
    """Labelled ticks on a log error axis that may span only a few points of error."""
    ticks = [t for t in NICE_TICKS if lo <= t <= hi]
    if len(ticks) < 4:  # a narrow range: evenly stepped values read better than sparse decades
        ticks = [t for t in MaxNLocator(nbins=6, steps=[1, 2, 2.5, 5, 10]).tick_values(lo, hi) if lo <= t <= hi]
    ax.yaxis.set_major_locator(FixedLocator(ticks))
    ax.yaxis.set_minor_locator(NullLocator())
    ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{100 * y:.3g}%"))


def _mathlaw(fit: F.PowerLawFit) -> str:
    law = rf"{fit.a:.3g}\,n^{{-{fit.alpha:.3f}}}"
    return rf"$\mathrm{{err}}(n) = {law} + {fit.c:.3f}$" if fit.irreducible else rf"$\mathrm{{err}}(n) = {law}$"


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
            (a_lo, a_hi), (c_lo, c_hi) = boot.interval("alpha"), boot.interval("c")
            ci_txt = rf"$\alpha$ = {fit.alpha:.3f} [{a_lo:.3f}, {a_hi:.3f}], c = {fit.c:.3f} [{c_lo:.3f}, {c_hi:.3f}]"
        else:
            ci_txt = rf"$\alpha$ = {fit.alpha:.3f}, c = {fit.c:.3f}"
        ax.plot(grid, fit.predict(grid), color=palette[0], lw=2, zorder=3, label=f"fit: {_mathlaw(fit)}\n{ci_txt}")
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
            _log_ticks(ax, lo, hi)
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


def plot_curves(exp: R.Experiment, used: pd.DataFrame):
    """Train loss and validation top-5 error by epoch: the largest subset per seed, then all subsets.

    Trials left out of the fit are drawn too (grey, dashed): a run stuck at chance is what
    these curves are for.
    """
    fig, axes = plt.subplots(2, 2, figsize=(13, 6.8), sharex=True, sharey="row")
    epochs = exp.epochs
    rows = [("train_loss", "Training loss"), ("val_top5_error", "Validation top-5 error")]
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
    if "val_top5_error" in epochs:
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


def _save_fig(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format=path.suffix[1:], dpi=200, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())


def _plain(obj):
    """JSON-safe: numpy scalars to Python, NaN/inf to null; drop the private `_` entries."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items() if not str(k).startswith("_")}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, (np.generic,)):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _md_table(df: pd.DataFrame) -> str:
    cells = [[str(v) for v in row] for row in df.itertuples(index=False)]
    lines = ["| " + " | ".join(df.columns) + " |", "|" + "---|" * len(df.columns)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in cells])


def display_table(summary: pd.DataFrame) -> pd.DataFrame:
    """The per-fraction table as people read it: errors in %, mean ± std [95% CI]."""
    out = summary[["fraction", "n_train", "n_seeds"] + (["n_left_out"] if "n_left_out" in summary else [])].copy()
    out["fraction"] = out["fraction"].map(lambda f: f"{f:g}")
    out["n_train"] = out["n_train"].map(lambda n: "" if pd.isna(n) else f"{int(n):,}")
    for m in R.ERROR_METRICS:
        def fmt(r, m=m):
            mean, std, lo, hi = (r[f"{m}_{s}"] for s in ("mean", "std", "ci_low", "ci_high"))
            if pd.isna(mean):
                return "–"
            text = f"{100 * mean:.2f}"
            return text if pd.isna(std) else f"{text} ± {100 * std:.2f} [{100 * lo:.2f}, {100 * hi:.2f}]"
        out[f"{m} (%)"] = summary.apply(fmt, axis=1)
    return out


def report_text(exp: R.Experiment, result: dict, table: pd.DataFrame, counts: str, metric: str) -> str:
    desc = (exp.config or {}).get("description") or ""
    lines = [f"# Scaling report: {exp.name}", ""] + ([desc, ""] if desc else []) + [
        f"Experiment `{exp.path}`. Fitted metric: `{metric}`. {counts}", "",
        "![Error against training-set size](scaling.png)", "", "## The law", ""]
    fit = result.get("_fit")
    if fit is None:
        lines.append(f"No fit: {result['no_fit_reason']}")
    else:
        lines.append(f"`{fit.formula()}` (n = training images; {fit.n_points} trials at {fit.n_sizes} sizes)")
        iv = result["intervals"]
        fmt = {"alpha": "{:.3f}", "c": "{:.4f}", "a": "{:.3g}"}
        lines += [""] + [f"- {p} = {fmt[p].format(getattr(fit, p))}" + (
            f" (95% CI {fmt[p].format(iv[p + '_ci'][0])} – {fmt[p].format(iv[p + '_ci'][1])})" if iv else "")
            for p in ("alpha", "c", "a")]
        lines.append(f"- fit quality in log space: RMSE {fit.rmse_log:.4f}, R² {fit.r2_log:.4f}; "
                     f"RMSE {100 * fit.rmse:.2f} points of error")
        if iv:
            lines.append(f"- intervals: percentile bootstrap, {iv['n_boot']} resamples of the seeds within each "
                         f"fraction ({iv['n_failed']} resamples with no fit)")
        if fit.c_at_bound:
            lines.append("- c sits at its bound (the smallest error): the data do not pin down the plateau")
        pf = result["plain_fit"]
        lines.append(f"- without an irreducible term (log-log line): `{pf['formula']}`, R² {pf['r2_log']:.4f}")
    lines += ["", "## Held-out check", ""]
    h = result.get("holdout")
    if h:
        lines.append(f"Fitted without the largest size (n = {h['n_heldout']:,.0f}): `{h['fit']['formula']}`. "
                     f"It predicts {100 * h['predicted']:.2f}% there; the trials measured {100 * h['observed']:.2f}% "
                     f"(prediction error {100 * h['abs_error']:+.2f} points, {100 * h['rel_error']:+.1f}%).")
    else:
        lines.append(f"Not done: {result.get('holdout_reason') or result.get('no_fit_reason')}")
    if result.get("_targets"):
        lines += ["", "## Training-set size for a target error", ""] + [f"- {s.describe()}" for s in result["_targets"]]
    lines += ["", "## Per fraction", "", "Errors in %: mean ± std over seeds [95% CI].", "", _md_table(table), "",
              "![Learning curves](curves.png)", "",
              "Files: [scaling.svg](scaling.svg), [summary.csv](summary.csv), [fit.json](fit.json).", ""]
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m analysis.plot_scaling", description=__doc__.splitlines()[0])
    p.add_argument("experiment_dir", type=Path, help="a sweep's <storage-path>/<name>")
    p.add_argument("--out", type=Path, help="output folder (default: EXPERIMENT_DIR/analysis)")
    p.add_argument("--metric", default="test_top5_error", choices=METRICS, help="the error to fit")
    p.add_argument("--include-unlearned", action="store_true", help="fit trials that did not learn too")
    p.add_argument("--target-error", type=float, nargs="+", default=[], metavar="X",
                   help="report the training-set size needed to reach these errors (fractions, e.g. 0.2)")
    p.add_argument("--bootstrap", type=int, default=1000, metavar="N", help="bootstrap resamples (0: none)")
    return p.parse_args(argv)


@cli_entry
def main(argv=None) -> int:
    args = parse_args(argv)
    if args.bootstrap < 0:
        raise RaysweepError(f"--bootstrap must be >= 0, got {args.bootstrap}")
    for t in args.target_error:
        if not 0 < t <= 1:
            raise RaysweepError(f"--target-error {t:g} must be an error fraction in (0, 1], e.g. 0.2 for 20%")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        exp = R.load_experiment(args.experiment_dir)
        used = R.trials_for_fit(exp.trials, include_unlearned=args.include_unlearned)
    out = (args.out or exp.path / "analysis").expanduser()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RaysweepError(f"cannot create output folder {out}: {e}") from e
    for w in caught:
        print(f"raysweep: warning: {w.message}", file=sys.stderr)
    left_out = exp.trials.loc[~exp.trials["trial_id"].isin(used["trial_id"]), "excluded"].value_counts().to_dict()
    counts = f"{len(exp.trials)} trials, {len(used)} used in the fit" + (
        "; left out: " + ", ".join(f"{v} {k}" for k, v in left_out.items()) if left_out else "") + "."
    result = analyse(used, args.metric, args.target_error, args.bootstrap)

    summary = R.per_fraction_summary(used, exp.trials)
    table = display_table(summary)
    with plt.rc_context():  # the seaborn theme stays inside this command, not in a caller's session
        sns.set_theme(context="paper", style="whitegrid", font_scale=1.25)
        fig = plot_scaling(exp, used, args.metric, result, args.include_unlearned)
        _save_fig(fig, out / "scaling.png")
        _save_fig(fig, out / "scaling.svg")
        plt.close(fig)
        fig = plot_curves(exp, used)
        _save_fig(fig, out / "curves.png")
        plt.close(fig)
    atomic_write_text(out / "summary.csv", summary.to_csv(index=False))
    doc = {"experiment": str(exp.path), "name": exp.name, "trials": len(exp.trials), "trials_used": len(used),
           "left_out": left_out, "include_unlearned": args.include_unlearned, **result}
    atomic_write_text(out / "fit.json", json.dumps(_plain(doc), indent=2, allow_nan=False) + "\n")
    atomic_write_text(out / "report.md", report_text(exp, result, table, counts, args.metric))

    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.max_colwidth", 40):
        print(table.to_string(index=False))
    fit = result.get("_fit")
    print(f"law ({args.metric}): " + (fit.formula() if fit else f"no fit: {result['no_fit_reason']}"))
    if fit is not None and result["intervals"]:
        lo, hi = result["intervals"]["alpha_ci"]
        print(f"alpha = {fit.alpha:.3f} (95% CI {lo:.3f} – {hi:.3f}), c = {fit.c:.4f}")
    for s in result.get("_targets", []):
        print(s.describe())
    print(f"wrote {out}/: scaling.png, scaling.svg, curves.png, summary.csv, fit.json, report.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
