"""report.md of one sweep: the warnings first, then the law, its checks, the curve-model
comparison, the per-fraction table, where the time went, and how to reproduce the run.

Text only (pandas for the tables); the numbers come from `analysis.plot_scaling.analyse`.
"""

from __future__ import annotations

import pandas as pd

from analysis import evidence
from analysis import results as R
from analysis import timing
from analysis.extrapolation import CLEARLY_FACTOR, CLEARLY_MIN_GAIN
from raysweep.console import python_command
from raysweep.trial.model import describe


def md_table(df: pd.DataFrame) -> str:
    cells = [[str(v) for v in row] for row in df.itertuples(index=False)]
    lines = ["| " + " | ".join(str(c) for c in df.columns) + " |", "|" + "---|" * len(df.columns)]
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
            if r["n_seeds"] == 1:
                return f"{text} [{evidence.ONE_SEED}]"
            return text if pd.isna(std) else f"{text} ± {100 * std:.2f} [{100 * lo:.2f}, {100 * hi:.2f}]"
        out[f"{m} (%)"] = summary.apply(fmt, axis=1)
    return out


def trained_model(exp: R.Experiment) -> dict:
    """The network the trials trained and its parameter count: from the trials' final reports,
    else the manifest, else the config (which has no count)."""
    name, params = exp.trial_value("model"), exp.trial_value("num_params")
    info = (exp.manifest or {}).get("model") or {}
    if name is None and info.get("name"):
        name = describe(info["name"], info.get("width") or 1.0)
    params = params if params is not None else info.get("num_params")
    if name is None:
        cfg = (exp.config or {}).get("model") or {}
        name = cfg.get("name") and describe(cfg["name"], cfg.get("width", 1.0))
    if name is None and (exp.config or {}).get("train"):
        name = "alexnet"  # configs before the model section trained torchvision's AlexNet only
    return {"name": name, "num_params": None if params is None else int(params)}


def _model_line(model: dict) -> str:
    if model["name"] is None:
        return "Model: not recorded."
    count = f"{model['num_params']:,} parameters" if model["num_params"] is not None else \
        "parameter count not recorded (an experiment made before it was)"
    return f"Model: `{model['name']}`, {count}."


def _warnings_section(warnings: list, joint: bool = False) -> list[str]:
    if not warnings:
        return [f"**No warnings.** Checked: {evidence.checks()}{'; ' + evidence.joint_checks() if joint else ''}.",
                ""]
    return [f"> **{len(warnings)} warning{'s' if len(warnings) > 1 else ''}: read these before the numbers.**",
            ">"] + [f"> - **{w.code}**: {w.message}" for w in warnings] + [""]


def _law_section(result: dict) -> list[str]:
    fit = result.get("_fit")
    if fit is None:
        return [f"No fit: {result['no_fit_reason']}"]
    lines = [f"`{fit.formula()}` ({fit.model.name}: {fit.model.describe}; n = training images; "
             f"{fit.n_points} trials at {fit.n_sizes} sizes)"]
    iv, no_iv = result["intervals"], result.get("intervals_reason")
    fmt = {"alpha": "{:.3f}", "c": "{:.4f}", "a": "{:.3g}"}
    lines.append("")
    for p in fit.model.params:
        f = fmt.get(p, "{:.4g}")
        ci = f" (95% CI {f.format(iv[p + '_ci'][0])} – {f.format(iv[p + '_ci'][1])})" if iv else \
            f" (95% CI {no_iv})" if no_iv else ""
        lines.append(f"- {p} = {f.format(getattr(fit, p))}{ci}")
    lines.append(f"- fit quality in log space: RMSE {fit.rmse_log:.4f}, R² {fit.r2_log:.4f}; "
                 f"RMSE {100 * fit.rmse:.2f} points of error")
    if iv:
        lines.append(f"- intervals: percentile bootstrap, {iv['n_boot']} resamples of the seeds within each "
                     f"fraction ({iv['n_failed']} resamples with no fit)")
    elif no_iv:
        lines.append(f"- intervals: {no_iv}: every size has a single seed, so there is nothing to resample; "
                     "more seeds (sweep.seeds) give intervals")
    if fit.c_at_bound:
        lines.append("- c sits at its bound (the smallest error): the data do not pin down the plateau")
    pf = result.get("plain_fit")
    if pf and fit.model.name != "pow2":
        lines.append(f"- without an irreducible term (log-log line): `{pf['formula']}`, R² {pf['r2_log']:.4f}")
    return lines


def _holdout_section(result: dict) -> list[str]:
    h = result.get("holdout")
    if not h:
        return [f"Not done: {result.get('holdout_reason') or result.get('no_fit_reason')}"]
    return [f"Fitted without the largest size (n = {h['n_heldout']:,.0f}): `{h['fit']['formula']}`. "
            f"It predicts {100 * h['predicted']:.2f}% there; the trials measured {100 * h['observed']:.2f}% "
            f"(prediction error {100 * h['abs_error']:+.2f} points, {100 * h['rel_error']:+.1f}%)."]


def _comparison_section(result: dict) -> list[str]:
    scores = result.get("_scores") or []
    if not scores:
        return [f"Not done: {result.get('no_fit_reason') or 'no fit'}"]
    law = result["model"]
    rows = []
    for rank, s in enumerate(scores, 1):
        by_held = {e.held: e for e in s.extrapolations}
        cell = (lambda h: f"{100 * by_held[h].mean_abs_error:.2f}" if h in by_held else "–")
        rows.append({"rank (BIC)": rank if s.fit else "–", "model": f"**{s.name}**" if s.name == law else s.name,
                     "law": f"`{s.fit.formula()}`" if s.fit else f"no fit: {s.reason}",
                     "RMSE (log)": f"{s.fit.rmse_log:.4f}" if s.fit else "–",
                     "AIC": f"{s.fit.aic:.1f}" if s.fit else "–", "BIC": f"{s.fit.bic:.1f}" if s.fit else "–",
                     "held-out: largest (points)": cell(1), "held-out: 2 largest (points)": cell(2)})
    lines = ["Every family fitted to the same trials. Held-out columns: mean |predicted − measured| error, in "
             "points, at the largest size (fitted on the rest) and at the two largest (fitted on the rest, "
             "with 5 or more sizes and enough left for the family's parameters). Lower BIC: better "
             "supported for its number of parameters.", "", md_table(pd.DataFrame(rows)), ""]
    better = result.get("_better")
    rule = (f"at most 1/{CLEARLY_FACTOR:g} of the held-out error of the reported law and "
            f"{100 * CLEARLY_MIN_GAIN:g} point less, on the held-out settings both have")
    if better:
        s, theirs, ours = better
        lines.append(f"**{s.name} extrapolates clearly better than {law}**: held-out error {100 * theirs:.2f} "
                     f"against {100 * ours:.2f} points (clearly: {rule}). Consider `--model {s.name}`.")
    elif any(e for s in scores if s.name == law for e in s.extrapolations):
        lines.append(f"No other family extrapolates clearly better than {law} (clearly: {rule}).")
    return lines


def _ci(iv: dict | None, p: str, fmt: str) -> str:
    return f" (95% CI {fmt.format(iv[p + '_ci'][0])} – {fmt.format(iv[p + '_ci'][1])})" if iv else ""


def _joint_law(joint: dict) -> list[str]:
    fit, iv = joint["_fit"], joint.get("intervals")
    lines = [f"`{fit.formula()}`", "",
             f"n = training images, m = model parameters; {fit.n_points} trials in {fit.n_cells} cells "
             f"({fit.n_sizes} sizes × {fit.n_models} widths). The form is Rosenfeld et al. 2020's, fitted as they "
             "fit it: least squares on the relative deviation (predicted − measured) / measured. Envelope "
             f"toward the random-guess error: {joint['envelope_rule']}.", ""]
    for p, fmt in (("a", "{:.4g}"), ("alpha", "{:.3f}"), ("b", "{:.4g}"), ("beta", "{:.3f}"), ("c", "{:.4f}")):
        lines.append(f"- {p} = {fmt.format(getattr(fit, p))}{_ci(iv, p, fmt)}")
    if fit.envelope:
        lines.append(f"- eta = eps0/a = {fit.eta:.4f}{_ci(iv, 'eta', '{:.4f}')} (the paper's eta, with its a = 1; "
                     "u is the power-law region, in error units, that the envelope joins to eps0)")
    lines.append(f"- fit quality: RMS relative deviation {100 * fit.rmse_rel:.2f}%, RMSE {100 * fit.rmse:.2f} points")
    if iv:
        lines.append(f"- intervals: percentile bootstrap, {iv['n_boot']} resamples of the seeds within each "
                     f"(n, width) cell ({iv['n_failed']} resamples with no fit)")
    return lines


def _joint_holdouts(joint: dict) -> list[str]:
    by_m = {v: float(k) for k, v in joint.get("num_params", {}).items()}
    rows, notes = [], []
    for axis, what in (("n", "without the largest n"), ("m", "without the widest model")):
        h = joint.get(f"_holdout_{axis}")
        if h is None:
            notes.append(f"- {what}: not done: {joint.get(f'holdout_{axis}_reason')}")
            continue
        thin = (f" Fitted on {h.fit.n_models} widths only: the width term's two parameters rest on one "
                "difference, so this check is weaker than it looks." if h.fit.n_models < evidence.JOINT_MIN_WIDTHS
                else "")
        notes.append(f"- {what}: mean miss **{100 * h.mean_abs_error:.2f} points** (worst "
                     f"{100 * h.max_abs_error:.2f}) over {len(h.cells)} cells; fitted law `{h.fit.formula()}`.{thin}")
        for (n, m), obs, pred in zip(h.cells, h.observed_each, h.predicted_each):
            rows.append({"check": what, "n_train": f"{n:,.0f}", "width": f"{by_m.get(int(m), float('nan')):g}",
                         "parameters": f"{m:,.0f}", "measured (%)": f"{100 * obs:.2f}",
                         "predicted (%)": f"{100 * pred:.2f}", "miss (points)": f"{100 * (pred - obs):+.2f}"})
    lines = ["Each check fits the law without one edge of the grid and predicts it, judged as the one-axis "
             "curves are: the mean |predicted − measured mean| over the held-out cells, in points of error.", ""]
    return lines + notes + ([""] + [md_table(pd.DataFrame(rows))] if rows else [])


def _joint_grid(joint: dict) -> list[str]:
    cells, best = joint["_cells"], joint["_best"]
    table = cells.pivot(index="n_train", columns="width", values="mean")
    winner = dict(zip(best["n_train"], best["best_width"]))
    rows = []
    for n, values in table.iterrows():
        row = {"n_train": f"{int(n):,}"}
        for w, v in values.items():
            text = "–" if pd.isna(v) else f"{100 * v:.2f}"
            row[f"width {w:g} (%)"] = f"**{text}**" if winner.get(int(n)) == w else text
        b = best[best["n_train"] == int(n)]
        row["best width"] = "–" if b.empty else f"{b['best_width'].iloc[0]:g}" + (
            f" (by {100 * b['gap'].iloc[0]:.2f} points)" if pd.notna(b["gap"].iloc[0]) else "")
        rows.append(row)
    return ["Mean error over seeds; bold: the best width at that n (the runner-up's gap beside it).", "",
            md_table(pd.DataFrame(rows))]


def _joint_per_width(joint: dict) -> list[str]:
    rows = []
    for r in joint.get("per_width", []):
        fit, iv = r["fit"], r["intervals"]
        rows.append({"width": f"{r['width']:g}", "parameters": f"{r['num_params']:,}",
                     "law (pow3)": f"`{fit['formula']}`" if fit else f"no fit: {r['reason']}",
                     "alpha": f"{fit['alpha']:.3f}" + (f" [{iv['alpha_ci'][0]:.3f}, {iv['alpha_ci'][1]:.3f}]"
                                                       if iv else "") if fit else "–",
                     "c": f"{fit['c']:.4f}" if fit else "–",
                     "RMSE (log)": f"{fit['rmse_log']:.4f}" if fit else "–"})
    return ["Each width fitted on its own, err(n) = a·n^(-alpha) + c, 95% bootstrap CI of alpha in brackets. "
            "The joint law shares one alpha across widths; these show whether the widths agree.", "",
            md_table(pd.DataFrame(rows))]


def _joint_frontier(joint: dict) -> list[str]:
    fit, iv = joint["_fit"], joint.get("intervals")
    if joint.get("frontier_reason"):
        return [f"No compute frontier: {joint['frontier_reason']}. The best width on the grid at each n is in "
                "the table above.", "", "![The grid and the law's map](frontier.png)"]
    rows = [{"n_train": f"{r['n_train']:,.0f} ({r['times_largest']}× the largest)",
             "m* (parameters)": f"{r['num_params']:,.0f}" + (
                 f" [{r['interval'][0]:,.0f}, {r['interval'][1]:,.0f}]" if r["interval"] else ""),
             "width ≈": f"{r['width']:.3g}", "law's error there (%)": f"{100 * r['error']:.2f}"}
            for r in joint["frontier"]]
    return [f"Rule: the {joint['frontier_rule']}. Each epoch costs about parameters × images, so at a fixed "
            f"compute the law's error is least there. Its exponent alpha/beta = {fit.alpha / fit.beta:.2f}"
            f"{_ci(iv, 'frontier_exponent', '{:.2f}')}: the compute-optimal model grows as "
            f"n^{fit.alpha / fit.beta:.2f}. Width ≈ reads m* through the grid's parameters-against-width line, "
            "in brackets the 95% bootstrap interval of m*. Beyond the largest n measured, these are extrapolations.",
            "", md_table(pd.DataFrame(rows)), "", "![The compute frontier](frontier.png)"]


def joint_section(joint: dict) -> list[str]:
    """The joint law over data and model size, for a grid of two or more widths."""
    lines = ["## The joint law over data and model size", ""]
    if joint.get("_fit") is None:
        return lines + [f"No joint law: {joint['no_fit_reason']}", ""]
    lines += _joint_law(joint) + ["", "![Error by training-set size and width](joint.png)", "",
                                  "### Held-out checks", ""] + _joint_holdouts(joint)
    lines += ["", "### Every cell of the grid", ""] + _joint_grid(joint)
    lines += ["", "### Each width's own law", ""] + _joint_per_width(joint)
    lines += ["", "### Which model size pays off", ""] + _joint_frontier(joint) + [""]
    return lines


def _time_section(time_table: pd.DataFrame | None, reason: str | None) -> list[str]:
    if time_table is None:
        return [f"Not shown: {reason}."]
    return ["Summed over each fraction's trials. Evaluation: validation every epoch and the final test; "
            "reporting: epoch wall time beyond training, evaluation and checkpointing; start-up: each "
            "attempt's time to its first optimizer step.", "",
            md_table(timing.display(time_table))]


def _reproduce_section(exp: R.Experiment) -> list[str]:
    m = exp.manifest
    if not m:
        return [f"No manifest.json (an experiment made before manifests were written); the exact config is "
                f"in `{R.CONFIG_FILE}`."]
    git = m.get("git") or {}
    env = m.get("environment") or {}
    data = m.get("data") or {}
    versions = ", ".join(f"{k} {v}" for k, v in (env.get("versions") or {}).items() if v)
    gpus = env.get("gpus") or []
    hw = f"{env.get('cpu_model') or 'CPU'} x {env.get('cpu_count')}" + (
        "; " + ", ".join(f"{g.get('name')} ({g.get('memory_mib')} MiB)" for g in gpus) if gpus else "; no GPU")
    commit = git.get("commit")
    code = f"git commit `{commit}`" + (" (the tree had uncommitted changes: they are not in that commit)"
                                       if git.get("dirty") else "") if commit else \
        f"no git commit recorded ({git.get('reason', 'not a git checkout')})"
    counts = ", ".join(f"{k} {v:,}" if isinstance(v, int) else f"{k} {v}"
                       for k, v in (data.get("counts") or {}).items())
    lines = [f"- code: {code}", f"- versions: {versions}", f"- machine: {env.get('os')}; {hw}",
             f"- data: `{data.get('source')}`, fingerprint `{data.get('fingerprint')}`" + (
                 f", {counts}" if counts else ""),
             f"- config hash: `{m.get('config_hash')}`; started {m.get('started_at')}, ended "
             f"{m.get('ended_at') or 'not recorded'} ({len(m.get('attempts') or [])} attempt(s))", "", "```bash"]
    if commit:
        lines.append(f"git checkout {commit}")
    if m.get("command"):
        lines.append(f"{m['command']}   # as it was run")
    lines += [python_command("-m", "raysweep.tune", "--config", exp.path / R.CONFIG_FILE, "--name",
                             exp.path.name + "-again") + "   # the exact resolved config", "```"]
    return lines


def report_text(exp: R.Experiment, result: dict, table: pd.DataFrame, counts: str, warnings: list,
                time_table: pd.DataFrame | None, time_reason: str | None, joint: dict | None = None) -> str:
    desc = (exp.config or {}).get("description") or ""
    lines = [f"# Scaling report: {exp.name}", ""] + ([desc, ""] if desc else [])
    lines += _warnings_section(warnings, joint is not None)
    lines += [f"Experiment `{exp.path}`. {_model_line(trained_model(exp))}", "",
              f"Fitted metric: {result['metric_rule']}. {counts}", ""]
    if joint is not None:
        lines += joint_section(joint) + [
            f"The one-axis sections below are the widest model's (width {result['width']:g}); the joint law "
            "above covers every width.", ""]
    lines += ["![Error against training-set size](scaling.png)", "", "## The law", ""]
    lines += _law_section(result)
    lines += ["", "## Held-out check", ""] + _holdout_section(result)
    lines += ["", "## Curve models compared", ""] + _comparison_section(result)
    if result.get("_targets"):
        lines += ["", "## Training-set size for a target error", ""] + [f"- {s.describe()}" for s in result["_targets"]]
    lines += ["", "## Per fraction", "", "Errors in %: mean ± std over seeds [95% CI].", "", md_table(table), "",
              "![Learning curves](curves.png)", "", "## Where the time went", ""]
    lines += _time_section(time_table, time_reason)
    lines += ["", "## Reproduce this", ""] + _reproduce_section(exp)
    lines += ["", "Files: [scaling.svg](scaling.svg), [summary.csv](summary.csv), [fit.json](fit.json).", ""]
    return "\n".join(lines)

