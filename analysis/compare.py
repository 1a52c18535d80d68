"""CLI: several sweeps on one figure: compare.png/.svg (the scaling curves and fitted laws),
compare.csv (one row per experiment and fraction) and compare.md.

    python -m analysis.compare EXP_DIR... [--labels A B ...] [--metric auto] --out DIR

Refuses, in one line, experiments run on different datasets or reporting different metrics.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from analysis.cli import HelpFormatter
from analysis.curves import MODEL_NAMES  # numpy only: cheap
from analysis.plot_scaling import METRICS  # its heavy imports are inside its functions
from raysweep.errors import RaysweepError, cli_entry



def dataset_identity(exp) -> dict:
    """What must match for two experiments' errors to be comparable: the data (the manifest's
    fingerprint when there is one, else the configured source and, for synthetic data, its shape)
    and the number of classes. Image size, model and optimizer may differ: they are what is compared."""
    data = (exp.manifest or {}).get("data") or {}
    cfg = (exp.config or {}).get("data") or {}
    ident = {}
    if data.get("fingerprint"):
        ident["fingerprint"] = data["fingerprint"]
    else:
        ident["source"] = data.get("source") or cfg.get("source")
        if ident["source"] == "synthetic":
            ident.update({k: v for k, v in cfg.items() if k.startswith("synthetic_")})
    classes = exp.trial_value("num_classes") or data.get("num_classes")
    if classes is not None:
        ident["num_classes"] = int(classes)
    return ident


def check_comparable(exps: list, labels: list[str], metrics: list[str]) -> None:
    """Raise RaysweepError (one line) unless every experiment has the first one's data and metric."""
    first = dataset_identity(exps[0])
    for exp, label, metric in zip(exps[1:], labels[1:], metrics[1:]):
        other = dataset_identity(exp)
        shared = set(first) & set(other)
        diff = [k for k in sorted(shared) if first[k] != other[k]]
        if not shared:
            raise RaysweepError(f"cannot compare {labels[0]} and {label}: neither a manifest nor a config "
                                "says which data they were run on")
        if diff:
            what = "; ".join(f"{k} {first[k]!r} vs {other[k]!r}" for k in diff)
            raise RaysweepError(f"cannot compare {labels[0]} and {label}: they were run on different datasets "
                                f"({what}); errors on different data are not comparable")
        if metric != metrics[0]:
            raise RaysweepError(f"cannot compare {labels[0]} and {label}: the metric is {metrics[0]} for one and "
                                f"{metric} for the other; pass --metric to fit the same error in both")


def _rows(label: str, exp, used, metric: str, result: dict) -> list[dict]:
    from analysis import results as R

    summary = R.per_fraction_summary(used, exp.trials, metrics=[metric])
    fit, boot = result.get("_fit"), result.get("_boot")
    law = {"model": result["model"], "formula": fit.formula() if fit else None,
           "no_fit_reason": result.get("no_fit_reason")}
    if fit is not None:
        for p in fit.model.params:
            law[p] = getattr(fit, p)
            if boot is not None:
                law[f"{p}_ci_low"], law[f"{p}_ci_high"] = boot.interval(p)
    rows = []
    for r in summary.itertuples(index=False):
        r = r._asdict()
        rows.append({"experiment": label, "path": str(exp.path), "metric": metric, "fraction": r["fraction"],
                     "n_train": r["n_train"], "n_seeds": r["n_seeds"], "mean_error": r[f"{metric}_mean"],
                     "std_error": r[f"{metric}_std"], "ci_low": r[f"{metric}_ci_low"],
                     "ci_high": r[f"{metric}_ci_high"], **law})
    return rows


def plot(entries: list[tuple], metric: str):
    """One log-log figure: each experiment's means with 95% CI, its seeds faint, its law."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    import seaborn as sns

    from analysis import figures
    from analysis import results as R

    with plt.rc_context():
        sns.set_theme(context="paper", style="whitegrid", font_scale=1.25)
        fig, ax = plt.subplots(figsize=(7.5, 5.6))
        palette = sns.color_palette("colorblind", max(len(entries), 3))
        markers = "osD^vP*X"
        all_n, all_y = [], []
        for i, (label, used, result) in enumerate(entries):
            color, pts = palette[i], used[["n_train", "fraction", metric]].dropna()
            if pts.empty:
                ax.plot([], [], color=color, label=f"{label}: no usable trials")
                continue
            ax.scatter(pts["n_train"], pts[metric], s=16, color=color, alpha=0.35, linewidths=0, zorder=2)
            summ = R.per_fraction_summary(used, metrics=[metric])
            yerr = np.vstack([summ[f"{metric}_mean"] - summ[f"{metric}_ci_low"],
                              summ[f"{metric}_ci_high"] - summ[f"{metric}_mean"]])
            fit = result.get("_fit")
            text = f"{label}: " + (fit.formula() if fit else f"no fit ({result.get('no_fit_reason', '')[:60]})")
            ax.errorbar(summ["n_train"], summ[f"{metric}_mean"], yerr=np.nan_to_num(yerr), color=color,
                        marker=markers[i % len(markers)], ms=6, mec="white", ls="none", capsize=3, zorder=4,
                        label=text)
            all_n += list(pts["n_train"].astype(float))
            all_y += list(pts[metric].astype(float))
            if fit is not None:
                grid = np.geomspace(pts["n_train"].min() / 1.15, pts["n_train"].max() * 1.15, 200)
                ax.plot(grid, fit.predict(grid), color=color, lw=1.8, zorder=3)
        if all_y and min(all_y) > 0:
            from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

            ax.set_xscale("log")
            ax.set_yscale("log")
            sizes = sorted(set(int(n) for n in all_n))
            if len(sizes) <= 8:  # the sizes themselves, not 10^k marks that crowd each other
                ax.xaxis.set_major_locator(FixedLocator(sizes))
                ax.xaxis.set_minor_locator(NullLocator())
                ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:,.0f}"))
            lo, hi = min(all_y) / 1.12, min(1.0, max(all_y) * 1.12)
            ax.set_ylim(lo, hi)
            figures.log_ticks(ax, lo, hi)
        ax.set_xlabel("Training images, n (log scale)")
        ax.set_ylabel(f"{figures.label(metric)} ({ax.get_yscale()} scale)")
        ax.set_title(f"{figures.label(metric)} vs. training-set size", loc="left")
        ax.legend(loc="upper left", bbox_to_anchor=(0.0, -0.15), fontsize=8.5, frameon=False, borderaxespad=0)
        fig.tight_layout()
    return fig


def markdown(entries: list[tuple], exps: list, rows, metric: str, rule: str) -> str:
    import pandas as pd

    from analysis import report as T

    laws = []
    for (label, used, result), exp in zip(entries, exps):
        fit, boot = result.get("_fit"), result.get("_boot")
        alpha = "–"
        if fit is not None and "alpha" in fit.model.params:
            alpha = f"{fit.alpha:.3f}" + (" [{:.3f}, {:.3f}]".format(*boot.interval("alpha")) if boot else "")
        hold = result.get("_holdout")
        model = T.trained_model(exp)
        laws.append({"experiment": label, "model": model["name"] or "–",
                     "parameters": f"{model['num_params']:,}" if model["num_params"] else "–",
                     "trials used": len(used),
                     "law": f"`{fit.formula()}`" if fit else f"no fit: {result['no_fit_reason']}",
                     "alpha [95% CI]": alpha,
                     "held-out error (points)": f"{100 * hold.abs_error:+.2f}" if hold is not None else "–"})
    table = rows.pivot_table(index="n_train", columns="experiment", values="mean_error", sort=True)
    table = table[[label for label, *_ in entries if label in table.columns]]
    shown = table.map(lambda v: "–" if pd.isna(v) else f"{100 * v:.2f}").reset_index()
    shown["n_train"] = shown["n_train"].map(lambda n: f"{int(n):,}")
    return "\n".join([
        f"# Comparison: {', '.join(label for label, *_ in entries)}", "",
        f"Metric: {rule}.", "", "![Comparison](compare.png)", "", "## Laws", "", T.md_table(pd.DataFrame(laws)), "",
        f"## Mean {metric} (%) by training-set size", "", T.md_table(shown), "",
        "Experiments: " + "; ".join(f"{label} = `{exp.path}`" for (label, *_), exp in zip(entries, exps)), "",
        "Files: [compare.svg](compare.svg), [compare.csv](compare.csv).", ""])


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m analysis.compare", description=__doc__.splitlines()[0],
                                formatter_class=HelpFormatter)
    p.add_argument("experiment_dirs", type=Path, nargs="+", metavar="EXP_DIR", help="sweeps to compare")
    p.add_argument("--labels", nargs="+", help="one name per experiment (default: the directories' names)")
    p.add_argument("--metric", default="auto", choices=METRICS,
                   help="the error to compare; auto: test top-5 error with >= 50 classes, else top-1")
    p.add_argument("--model", default="pow3", choices=MODEL_NAMES, help="the curve family fitted to each")
    p.add_argument("--include-unlearned", action="store_true", help="use trials that did not learn too")
    p.add_argument("--bootstrap", type=int, default=200, metavar="N", help="bootstrap resamples per law (0: none)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    return p.parse_args(argv)


@cli_entry
def main(argv=None) -> int:
    args = parse_args(argv)
    if len(args.experiment_dirs) < 2:
        raise RaysweepError("compare needs at least two experiment directories")
    labels = args.labels or [p.name for p in args.experiment_dirs]
    if len(labels) != len(args.experiment_dirs):
        raise RaysweepError(f"--labels gives {len(labels)} names for {len(args.experiment_dirs)} experiments")
    if len(set(labels)) != len(labels):
        raise RaysweepError(f"experiment labels must differ, got {labels}; pass --labels")
    if args.bootstrap < 0:
        raise RaysweepError(f"--bootstrap must be >= 0, got {args.bootstrap}")
    import warnings

    import pandas as pd

    from analysis import figures, plot_scaling
    from analysis import results as R
    from raysweep.io import atomic_write_text

    exps, metrics, rules = [], [], []
    for path in args.experiment_dirs:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            exp = R.load_experiment(path)
        metric, rule = R.resolve_metric(exp, args.metric)
        if metric not in exp.trials:
            raise RaysweepError(f"cannot compare: {exp.path} does not report {metric}")
        exps.append(exp)
        metrics.append(metric)
        rules.append(rule)
    check_comparable(exps, labels, metrics)
    metric = metrics[0]
    entries, rows = [], []
    for label, exp in zip(labels, exps):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            used = R.trials_for_fit(exp.trials, include_unlearned=args.include_unlearned)
        result = plot_scaling.analyse(used, metric, [], args.bootstrap, model=args.model)
        entries.append((label, used, result))
        rows += _rows(label, exp, used, metric, result)
    table = pd.DataFrame(rows)
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RaysweepError(f"cannot create output folder {args.out}: {e}") from e
    fig = plot(entries, metric)
    figures.save_fig(fig, args.out / "compare.png")
    figures.save_fig(fig, args.out / "compare.svg")
    import matplotlib.pyplot as plt

    plt.close(fig)
    atomic_write_text(args.out / "compare.csv", table.to_csv(index=False))
    atomic_write_text(args.out / "compare.md", markdown(entries, exps, table, metric, rules[0]))
    for label, used, result in entries:
        fit = result.get("_fit")
        print(f"{label}: " + (fit.formula() if fit else f"no fit: {result['no_fit_reason']}"))
    print(f"wrote {args.out}/: compare.png, compare.svg, compare.csv, compare.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
