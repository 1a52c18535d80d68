"""CLI: one sweep's scaling law: scaling.png/.svg, curves.png, summary.csv, fit.json, report.md;
with two or more widths in the grid, also the joint law over data and model size: joint.png, frontier.png.

    python -m analysis.plot_scaling EXPERIMENT_DIR [--out DIR] [--metric auto] [--model pow3]

Heavy modules (pandas, scipy, matplotlib, seaborn, mlflow) are imported in `main`, so that
`--help` answers at once.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from pathlib import Path

from analysis.cli import HelpFormatter
from analysis.curves import MODEL_NAMES  # numpy only: cheap
from raysweep.errors import RaysweepError, cli_entry

METRICS = ["auto", "test_top5_error", "test_top1_error", "val_top5_error", "val_top1_error"]
DEFAULT_MODEL = "pow3"  # the law's family unless --model says otherwise (compare: see its --model auto)
OUTPUTS = ["scaling.png", "scaling.svg", "curves.png", "summary.csv", "fit.json", "report.md"]
JOINT_OUTPUTS = ["joint.png", "frontier.png"]


def analyse(used, metric: str, targets: list[float], n_boot: int, seed: int = 0, model: str = DEFAULT_MODEL) -> dict:
    """Fit the law (`model`) to the used trials, check it on held-out sizes, and compare every
    curve family on the same points; every part that cannot be computed says why instead.
    With one seed at every size there is nothing to resample: no bootstrap, and
    `intervals_reason` says so (evidence.ONE_SEED)."""
    from analysis import curvefit as CF
    from analysis import evidence
    from analysis import extrapolation as X
    from analysis import fit as F

    n, err, groups = used["n_train"].to_numpy(float), used[metric].to_numpy(float), used["fraction"].to_numpy()
    out: dict = {"metric": metric, "model": model, "fit": None, "no_fit_reason": None, "intervals": None,
                 "plain_fit": None, "holdout": None, "holdout_reason": None, "targets": [], "models": [],
                 "intervals_reason": None, "better_model": None, "bootstrap_seed": seed}
    if used.empty:
        out["no_fit_reason"] = "no usable trials: every trial was left out of the fit"
        return out
    if n_boot > 0 and evidence.one_seed(used):
        n_boot, out["intervals_reason"] = 0, evidence.ONE_SEED
    try:
        boot = CF.bootstrap_curve(model, n, err, groups, n_boot=n_boot, seed=seed) if n_boot > 0 else None
        fit = boot.fit if boot else CF.fit_curve(model, n, err)
    except RaysweepError as e:
        out["no_fit_reason"] = str(e)
        return out
    out.update(fit=fit.to_dict(), intervals=boot.to_dict() if boot else None,
               plain_fit=F.fit_power_law(n, err, irreducible=False).to_dict())
    out["_fit"], out["_boot"] = fit, boot
    try:
        out["_holdout"] = X.extrapolate(model, n, err, held=1)
        out["holdout"] = out["_holdout"].to_dict()
    except RaysweepError as e:
        out["holdout_reason"] = str(e)
    out["_targets"] = [F.size_for_error(boot or fit, t) for t in targets]
    out["targets"] = [s.to_dict() for s in out["_targets"]]
    out["_scores"] = X.compare_models(n, err)
    out["models"] = [s.to_dict() for s in out["_scores"]]
    out["_better"] = X.clearly_better(out["_scores"], model)
    if out["_better"]:
        s, theirs, ours = out["_better"]
        out["better_model"] = {"name": s.name, "extrapolation_error": theirs, "law_extrapolation_error": ours}
    return out


def _plain(obj):
    """JSON-safe: numpy scalars to Python, NaN/inf to null; drop the private `_` entries."""
    import numpy as np

    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items() if not str(k).startswith("_")}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _val_metric(exp, metric: str) -> str:
    """The validation error the learning curves show: the one that picked each trial's best
    epoch (`select_metric`), else the validation twin of the fitted metric."""
    chosen = exp.trial_value("select_metric")
    if chosen in exp.epochs:
        return chosen
    twin = metric.replace("test_", "val_")
    return twin if twin in exp.epochs else "val_top5_error"


def _one_width(exp, used, widths: list[float]):
    """The experiment and used trials the one-axis analysis reads: all of them on a one-width grid;
    on a wider grid the widest model's (pooling widths at one n would mix models, not seeds)."""
    if len(widths) < 2:
        return exp, used, None
    from dataclasses import replace

    from analysis.widths import widths_of

    widest = max(widths_of(used) or widths)
    trials = exp.trials[exp.trials["width"] == widest].reset_index(drop=True)
    epochs = exp.epochs[exp.epochs["trial_id"].isin(trials["trial_id"])].reset_index(drop=True)
    return replace(exp, trials=trials, epochs=epochs), used[used["width"] == widest].reset_index(drop=True), widest


def _joint(exp, used, metric: str, args) -> dict:
    """The joint law of a grid with >= 2 widths, with the envelope unless asked not to or the
    number of classes (and so the random-guess error) is not known."""
    from analysis import joint as J
    from analysis.widths import analyse_joint

    classes = exp.trial_value("num_classes")
    eps0 = None if args.no_envelope or classes is None else J.random_guess_error(metric, int(classes))
    joint = analyse_joint(used, metric, args.bootstrap, eps0=eps0)
    joint["envelope_rule"] = ("off (--no-envelope)" if args.no_envelope else
                              "off: the trials do not report their number of classes" if classes is None else
                              f"on: eps0 = 1 - k/C = {eps0:.3f} (top-{5 if 'top5' in metric else 1} of "
                              f"{int(classes)} classes)")
    return joint


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m analysis.plot_scaling", description=__doc__.splitlines()[0],
                                formatter_class=HelpFormatter)
    p.add_argument("experiment_dir", type=Path, help="a sweep's <storage-path>/<name>")
    p.add_argument("--out", type=Path, help="output folder (default: EXPERIMENT_DIR/analysis)")
    p.add_argument("--metric", default="auto", choices=METRICS,
                   help="the error to fit; auto: test top-5 error with >= 50 classes, else top-1")
    p.add_argument("--model", default=DEFAULT_MODEL, choices=MODEL_NAMES,
                   help="the curve family of the reported law (every family is compared either way)")
    p.add_argument("--include-unlearned", action="store_true", help="fit trials that did not learn too")
    p.add_argument("--target-error", type=float, nargs="+", default=[], metavar="X",
                   help="report the training-set size needed to reach these errors (fractions, e.g. 0.2)")
    p.add_argument("--bootstrap", type=int, default=1000, metavar="N", help="bootstrap resamples (0: none)")
    p.add_argument("--no-envelope", action="store_true",
                   help="fit the joint law (a grid with >= 2 widths) without Rosenfeld et al.'s envelope toward "
                        "the random-guess error")
    p.add_argument("--mlflow", metavar="URI", help="also log the figures and fit.json to this MLflow store, "
                                                   "as a parent run of the sweep's trial runs")
    return p.parse_args(argv)


@cli_entry
def main(argv=None) -> int:
    args = parse_args(argv)
    if args.bootstrap < 0:
        raise RaysweepError(f"--bootstrap must be >= 0, got {args.bootstrap}")
    for t in args.target_error:
        if not 0 < t <= 1:
            raise RaysweepError(f"--target-error {t:g} must be an error fraction in (0, 1], e.g. 0.2 for 20%")
    if args.mlflow:
        from raysweep.sweep import tracking

        tracking.tracking_uri(args.mlflow)  # installed, and a URI MLflow knows
    import pandas as pd

    from analysis import evidence, timing
    from analysis import report as T
    from analysis import results as R
    from raysweep.io import atomic_write_text

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
    metric, rule = R.resolve_metric(exp, args.metric)
    if metric not in exp.trials:
        raise RaysweepError(f"--metric {metric}: the trials of {exp.path} do not report it")
    left_out = exp.trials.loc[~exp.trials["trial_id"].isin(used["trial_id"]), "excluded"].value_counts().to_dict()
    counts = f"{len(exp.trials)} trials, {len(used)} used in the fit" + (
        "; left out: " + ", ".join(f"{v} {k}" for k, v in left_out.items()) if left_out else "") + "."
    from analysis.widths import widths_of

    widths = widths_of(exp.trials)
    one_exp, one, widest = _one_width(exp, used, widths)
    result = analyse(one, metric, args.target_error, args.bootstrap, model=args.model)
    result["metric_rule"] = rule
    if widest is not None:
        result["width"] = widest  # the one-axis law is of this width's trials; one width: of every trial
    found = evidence.judge(one, result, exp.config)
    joint = _joint(exp, used, metric, args) if widest is not None else None
    if joint is not None:
        found += evidence.judge_joint(joint, used)
    time_table, time_reason = timing.time_table(exp.epochs)
    summary = R.per_fraction_summary(one, one_exp.trials)
    table = T.display_table(summary)

    from analysis import figures

    figures.draw_all(one_exp, one, metric, result, args.include_unlearned, _val_metric(exp, metric), out)
    outputs = OUTPUTS
    if joint is not None:
        from analysis import figures_joint

        figures_joint.draw_joint(joint, used, metric, exp.name, out)
        outputs = OUTPUTS + [f for f in JOINT_OUTPUTS if (out / f).exists()]
    atomic_write_text(out / "summary.csv", summary.to_csv(index=False))
    doc = {"experiment": str(exp.path), "name": exp.name, "trials": len(exp.trials), "trials_used": len(used),
           "left_out": left_out, "include_unlearned": args.include_unlearned, **result,
           "warnings": [w.to_dict() for w in found], "trained_model": T.trained_model(one_exp),
           "time": None if time_table is None else time_table.to_dict(orient="records"), "time_reason": time_reason}
    if joint is not None:
        doc["joint"] = joint
    atomic_write_text(out / "fit.json", json.dumps(_plain(doc), indent=2, allow_nan=False) + "\n")
    atomic_write_text(out / "report.md", T.report_text(one_exp, result, table, counts, found, time_table, time_reason,
                                                       joint=joint))

    for w in found:
        print(f"raysweep: warning: {w.code}: {w.message}", file=sys.stderr)
    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.max_colwidth", 40):
        print(table.to_string(index=False))
    fit = result.get("_fit")
    print(f"law ({metric}, {args.model}): " + (fit.formula() if fit else f"no fit: {result['no_fit_reason']}"))
    if fit is not None and "alpha" in fit.model.params and (result["intervals"] or result["intervals_reason"]):
        ci = result["intervals_reason"] or "{:.3f} – {:.3f}".format(*result["intervals"]["alpha_ci"])
        print(f"alpha = {fit.alpha:.3f} (95% CI {ci}), c = {fit.c:.4f}")
    for s in result.get("_targets", []):
        print(s.describe())
    if joint is not None:
        jf = joint.get("_fit")
        print(f"joint law ({metric}, {len(joint['widths'])} widths): "
              + (jf.formula() if jf else f"no fit: {joint['no_fit_reason']}"))
        for axis, what in (("n", "without the largest n"), ("m", "without the widest model")):
            h = joint.get(f"_holdout_{axis}")
            print(f"  held-out {what}: " + (f"mean miss {100 * h.mean_abs_error:.2f} points" if h else
                                            f"not done: {joint[f'holdout_{axis}_reason']}"))
    print(f"wrote {out}/: {', '.join(outputs)}")
    if args.mlflow:
        from raysweep.sweep import tracking

        run_id = tracking.log_analysis(args.mlflow, exp.path.name, [out / f for f in outputs], result)
        for line in tracking.notes(args.mlflow, f"the analysis logged as run {run_id} of experiment {exp.path.name!r}"):
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
