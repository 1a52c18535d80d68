"""report.md of one sweep: the warnings first, then the law, its checks, the curve-model
comparison, the per-fraction table, where the time went, and how to reproduce the run.

Text only (pandas for the tables); the numbers come from `analysis.plot_scaling.analyse`.
"""

from __future__ import annotations

import shlex

import pandas as pd

from analysis import evidence
from analysis import results as R
from analysis import timing
from analysis.extrapolation import CLEARLY_FACTOR, CLEARLY_MIN_GAIN
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


def _warnings_section(warnings: list) -> list[str]:
    if not warnings:
        return [f"**No warnings.** Checked: {evidence.checks()}.", ""]
    return [f"> **{len(warnings)} warning{'s' if len(warnings) > 1 else ''}: read these before the numbers.**",
            ">"] + [f"> - **{w.code}**: {w.message}" for w in warnings] + [""]


def _law_section(result: dict) -> list[str]:
    fit = result.get("_fit")
    if fit is None:
        return [f"No fit: {result['no_fit_reason']}"]
    lines = [f"`{fit.formula()}` ({fit.model.name}: {fit.model.describe}; n = training images; "
             f"{fit.n_points} trials at {fit.n_sizes} sizes)"]
    iv = result["intervals"]
    fmt = {"alpha": "{:.3f}", "c": "{:.4f}", "a": "{:.3g}"}
    lines.append("")
    for p in fit.model.params:
        f = fmt.get(p, "{:.4g}")
        ci = f" (95% CI {f.format(iv[p + '_ci'][0])} – {f.format(iv[p + '_ci'][1])})" if iv else ""
        lines.append(f"- {p} = {f.format(getattr(fit, p))}{ci}")
    lines.append(f"- fit quality in log space: RMSE {fit.rmse_log:.4f}, R² {fit.r2_log:.4f}; "
                 f"RMSE {100 * fit.rmse:.2f} points of error")
    if iv:
        lines.append(f"- intervals: percentile bootstrap, {iv['n_boot']} resamples of the seeds within each "
                     f"fraction ({iv['n_failed']} resamples with no fit)")
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
    lines += [f"python -m raysweep.tune --config {shlex.quote(str(exp.path / R.CONFIG_FILE))} "
              f"--name {shlex.quote(exp.path.name + '-again')}   # the exact resolved config", "```"]
    return lines


def report_text(exp: R.Experiment, result: dict, table: pd.DataFrame, counts: str, warnings: list,
                time_table: pd.DataFrame | None, time_reason: str | None) -> str:
    desc = (exp.config or {}).get("description") or ""
    lines = [f"# Scaling report: {exp.name}", ""] + ([desc, ""] if desc else [])
    lines += _warnings_section(warnings)
    lines += [f"Experiment `{exp.path}`. {_model_line(trained_model(exp))}", "",
              f"Fitted metric: {result['metric_rule']}. {counts}", "",
              "![Error against training-set size](scaling.png)", "", "## The law", ""]
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

