"""CLI: several sweeps on one figure, compare.png/.svg (the scaling curves and fitted laws), with
compare.csv (one row per experiment and fraction) and compare.md, each law with its warnings.

    python -m analysis.compare EXP_DIR... [--labels A B ...] [--metric auto] [--model auto] --out DIR

Each law is fitted and judged as analysis.plot_scaling does (the same fit, held-out check and
evidence warnings). Experiments run on different datasets or reporting different metrics are
refused in one line.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from analysis.cli import HelpFormatter
from analysis.curves import MODEL_NAMES  # numpy only: cheap
from analysis.plot_scaling import DEFAULT_MODEL, METRICS  # its heavy imports are inside its functions
from raysweep.errors import RaysweepError, cli_entry


def reported_model(exp_dir: Path) -> str | None:
    """The curve family of the experiment's own report (analysis/fit.json by plot_scaling), if any."""
    import json

    try:
        return json.loads((Path(exp_dir) / "analysis" / "fit.json").read_text()).get("model")
    except (OSError, ValueError, AttributeError):
        return None


def choose_model(requested: str, exps: list) -> tuple[str, str]:
    """The family fitted to every experiment and why: --model when given; for auto, the family
    their own reports used (so compare shows the laws plot_scaling showed), else plot_scaling's default."""
    if requested != "auto":
        return requested, "--model"
    seen = [reported_model(e.path) for e in exps]
    if seen[0] and len(set(seen)) == 1:
        return seen[0], "the family of their own reports (analysis/fit.json)"
    why = "their reports name different families" if len(set(s for s in seen if s)) > 1 else \
        "not every experiment has a report (analysis/fit.json)"
    return DEFAULT_MODEL, f"plot_scaling's default; {why}"



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


def _rows(label: str, exp, used, metric: str, result: dict, found: list) -> list[dict]:
    from analysis import evidence
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
    # An interval that cannot be drawn is left empty and says why, never a zero-width one.
    law["interval_note"] = result.get("intervals_reason") or ""
    law["warnings"] = "; ".join(w.code for w in found)
    law["warning_messages"] = " | ".join(f"{w.code}: {w.message}" for w in found)
    rows = []
    for r in summary.itertuples(index=False):
        r = r._asdict()
        rows.append({"experiment": label, "path": str(exp.path), "metric": metric, "fraction": r["fraction"],
                     "n_train": r["n_train"], "n_seeds": r["n_seeds"], "mean_error": r[f"{metric}_mean"],
                     "std_error": r[f"{metric}_std"], "ci_low": r[f"{metric}_ci_low"],
                     "ci_high": r[f"{metric}_ci_high"],
                     "ci_note": evidence.ONE_SEED if r["n_seeds"] == 1 else "", **law})
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


def markdown(entries: list[tuple], exps: list, rows, metric: str, rule: str, model_rule: str,
             findings: list[list]) -> str:
    import pandas as pd

    from analysis import evidence
    from analysis import report as T

    laws, warned = [], []
    for (label, used, result), exp, found in zip(entries, exps, findings):
        fit, boot = result.get("_fit"), result.get("_boot")
        alpha = "–"
        if fit is not None and "alpha" in fit.model.params:
            alpha = f"{fit.alpha:.3f}" + (" [{:.3f}, {:.3f}]".format(*boot.interval("alpha")) if boot else
                                          f" [{result['intervals_reason']}]" if result.get("intervals_reason") else "")
        warned += [f"- **{label}**: **{w.code}**: {w.message}" for w in found]
        hold = result.get("_holdout")
        model = T.trained_model(exp)
        laws.append({"experiment": label, "model": model["name"] or "–",
                     "parameters": f"{model['num_params']:,}" if model["num_params"] else "–",
                     "trials used": len(used),
                     "law": f"`{fit.formula()}`" if fit else f"no fit: {result['no_fit_reason']}",
                     "alpha [95% CI]": alpha,
                     "held-out error (points)": f"{100 * hold.abs_error:+.2f}" if hold is not None else "–",
                     "warnings": ", ".join(w.code for w in found) or "none"})
    table = rows.pivot_table(index="n_train", columns="experiment", values="mean_error", sort=True)
    table = table[[label for label, *_ in entries if label in table.columns]]
    shown = table.map(lambda v: "–" if pd.isna(v) else f"{100 * v:.2f}").reset_index()
    shown["n_train"] = shown["n_train"].map(lambda n: f"{int(n):,}")
    if warned:
        head = [f"> **{len(warned)} warning{'s' if len(warned) > 1 else ''}, as each experiment's own report "
                "would raise them: read these before the numbers.**", ">"] + [f"> {w}" for w in warned]
    else:
        head = [f"**No warnings.** Checked for each experiment: {evidence.checks()}."]
    return "\n".join([
        f"# Comparison: {', '.join(label for label, *_ in entries)}", "", *head, "",
        f"Metric: {rule}. Law: {entries[0][2]['model']} ({model_rule}).", "", "![Comparison](compare.png)", "",
        "## Laws", "", T.md_table(pd.DataFrame(laws)), "",
        f"## Mean {metric} (%) by training-set size", "", T.md_table(shown), "",
        "Experiments: " + "; ".join(f"{label} = `{exp.path}`" for (label, *_), exp in zip(entries, exps)), "",
        "Files: [compare.svg](compare.svg), [compare.csv](compare.csv).", ""])


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m analysis.compare", formatter_class=HelpFormatter,
                                description=__doc__.split("\n\n")[0].replace("\n", " "),
                                epilog=__doc__.split("\n\n", 2)[2].replace("\n", " ").strip())
    p.add_argument("experiment_dirs", type=Path, nargs="+", metavar="EXP_DIR", help="sweeps to compare")
    p.add_argument("--labels", nargs="+", help="one name per experiment (default: the directories' names)")
    p.add_argument("--metric", default="auto", choices=METRICS,
                   help="the error to compare; auto: test top-5 error with >= 50 classes, else top-1")
    p.add_argument("--model", default="auto", choices=["auto", *MODEL_NAMES],
                   help="the curve family fitted to each; auto: the family of the experiments' own reports "
                        f"(EXP_DIR/analysis/fit.json) when they agree, else {DEFAULT_MODEL} (plot_scaling's default)")
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

    from analysis import evidence, figures, plot_scaling
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
    model, model_rule = choose_model(args.model, exps)
    entries, rows, findings = [], [], []
    for label, exp in zip(labels, exps):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            used = R.trials_for_fit(exp.trials, include_unlearned=args.include_unlearned)
        result = plot_scaling.analyse(used, metric, [], args.bootstrap, model=model)
        found = evidence.judge(used, result, exp.config)
        entries.append((label, used, result))
        findings.append(found)
        rows += _rows(label, exp, used, metric, result, found)
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
    atomic_write_text(args.out / "compare.md", markdown(entries, exps, table, metric, rules[0], model_rule, findings))
    for (label, _, _), found in zip(entries, findings):
        for w in found:  # plot_scaling's lines, with the experiment named
            print(f"raysweep: warning: {label}: {w.code}: {w.message}", file=sys.stderr)
    print(f"law ({metric}, {model}: {model_rule}):")
    for label, used, result in entries:
        fit = result.get("_fit")
        print(f"{label}: " + (fit.formula() if fit else f"no fit: {result['no_fit_reason']}"))
    print(f"wrote {args.out}/: compare.png, compare.svg, compare.csv, compare.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
