"""analysis.compare: several sweeps on one figure, compare.csv holding each one's own numbers,
compare.md, and one-line refusals of experiments that cannot be compared."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from analysis import compare, plot_scaling
from analysis import results as R
from analysis.curvefit import fit_curve
from test_analysis import modern_experiment

REPO = Path(__file__).resolve().parent.parent


def _serve(monkeypatch, exps: dict[str, R.Experiment]) -> None:
    monkeypatch.setattr(R, "load_experiment", lambda path: exps[Path(path).name])


def _two(tmp_path, **other) -> dict[str, R.Experiment]:
    a = modern_experiment(tmp_path / "sgd")
    b = modern_experiment(tmp_path / "adamw", **other)
    b.trials[["test_top5_error", "test_top1_error"]] *= 0.8  # the better optimizer
    return {"sgd": a, "adamw": b}


def test_two_sweeps_on_one_figure_with_their_own_numbers(tmp_path, monkeypatch, capsys):
    exps = _two(tmp_path)
    _serve(monkeypatch, exps)
    out = tmp_path / "cmp"
    argv = [str(tmp_path / "sgd"), str(tmp_path / "adamw"), "--labels", "SGD", "AdamW", "--out", str(out),
            "--bootstrap", "50"]
    assert compare.main(argv) == 0
    assert {p.name for p in out.iterdir()} == {"compare.png", "compare.svg", "compare.csv", "compare.md"}
    with Image.open(out / "compare.png") as im:
        assert im.width > 800 and np.asarray(im.convert("L")).std() > 10
    table = pd.read_csv(out / "compare.csv")
    assert list(table["experiment"].unique()) == ["SGD", "AdamW"] and (table["metric"] == "test_top5_error").all()
    for label, exp in zip(("SGD", "AdamW"), exps.values()):
        mine = table[table["experiment"] == label].set_index("fraction")
        for fraction, group in exp.trials.groupby("fraction"):
            assert mine.loc[fraction, "mean_error"] == pytest.approx(group["test_top5_error"].mean())
            assert mine.loc[fraction, "ci_low"] <= mine.loc[fraction, "mean_error"] <= mine.loc[fraction, "ci_high"]
        own = fit_curve("pow3", exp.trials["n_train"], exp.trials["test_top5_error"])
        # The same points fitted independently; the optimizer pins alpha to ~1e-6 (ftol 1e-13).
        assert mine["alpha"].iloc[0] == pytest.approx(own.alpha, rel=1e-5)
        assert mine["alpha_ci_low"].iloc[0] <= own.alpha <= mine["alpha_ci_high"].iloc[0]
    md = (out / "compare.md").read_text()
    assert "![Comparison](compare.png)" in md and "| SGD | alexnet(width=0.25) | 2,470,000 |" in md
    assert "## Mean test_top5_error (%) by training-set size" in md and "| 50,000 |" in md
    assert "SGD: err(n) =" in capsys.readouterr().out


def _warnings(err: str, label: str | None = None) -> list[str]:
    """The `code: message` of each warning line (compare names the experiment first)."""
    head = "raysweep: warning: " + (f"{label}: " if label else "")
    return [line[len(head):] for line in err.splitlines() if line.startswith(head)]


@pytest.mark.parametrize("model, codes", [("pow3", ["few_sizes", "few_seeds"]), ("pow2", ["few_seeds"])])
def test_compare_raises_the_warnings_plot_scaling_raises_and_no_zero_width_interval(tmp_path, monkeypatch, capsys,
                                                                                     model, codes):
    """Two 4-size, 1-seed sweeps, each analysed by plot_scaling (its default pow3, or pow2 as make
    demo does): compare fits the same family, and prints and writes into compare.md and
    compare.csv the same warnings plot_scaling printed for each."""
    fractions = (1.0, 0.5, 0.25, 0.125)
    exps = {"a": modern_experiment(tmp_path / "a", fractions=fractions, seeds=(0,)),
            "b": modern_experiment(tmp_path / "b", fractions=fractions, seeds=(0,), noise=0.05)}
    _serve(monkeypatch, exps)
    own = {}
    for name in exps:
        assert plot_scaling.main([str(tmp_path / name), "--model", model, "--bootstrap", "50"]) == 0
        out, err = capsys.readouterr()
        own[name] = _warnings(err)
        assert "alpha = " in out and "(95% CI n/a (1 seed))" in out
        report = (tmp_path / name / "analysis" / "report.md").read_text()
        assert "- alpha = " in report and "(95% CI n/a (1 seed))" in report and "[n/a (1 seed)]" in report
    assert [w.split(":")[0] for w in own["a"]] == codes, own
    out_dir = tmp_path / "cmp"
    assert compare.main([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out_dir), "--bootstrap", "50"]) == 0
    out, err = capsys.readouterr()
    for name in exps:
        assert _warnings(err, name) == own[name]
    assert f"law (test_top5_error, {model}: the family of their own reports (analysis/fit.json)):" in out
    table = pd.read_csv(out_dir / "compare.csv", keep_default_na=False)
    for name in exps:
        mine = table[table["experiment"] == name]
        assert (mine["model"] == model).all()
        assert set(mine["warnings"]) == {"; ".join(w.split(":")[0] for w in own[name])}
        assert set(mine["warning_messages"]) == {" | ".join(own[name])}
        assert set(mine["interval_note"]) == {"n/a (1 seed)"} and set(mine["ci_note"]) == {"n/a (1 seed)"}
        assert "alpha_ci_low" not in table, "no zero-width interval"
        assert set(mine["ci_low"]) == {""}
    md = (out_dir / "compare.md").read_text()
    for name in exps:
        for w in own[name]:
            code, message = w.split(": ", 1)
            assert f"- **{name}**: **{code}**: {message}" in md
    assert "[n/a (1 seed)]" in md and f"Law: {model} (the family of their own reports" in md


def test_auto_model_falls_back_to_plot_scalings_default(tmp_path, monkeypatch, capsys):
    exps = _two(tmp_path)
    _serve(monkeypatch, exps)
    assert compare.choose_model("auto", list(exps.values())) == (
        "pow3", "plot_scaling's default; not every experiment has a report (analysis/fit.json)")
    for name, model in (("sgd", "pow2"), ("adamw", "exp3")):
        (tmp_path / name / "analysis").mkdir(parents=True)
        (tmp_path / name / "analysis" / "fit.json").write_text(json.dumps({"model": model}))
    assert compare.choose_model("auto", list(exps.values()))[1] == (
        "plot_scaling's default; their reports name different families")
    assert compare.choose_model("vap3", list(exps.values())) == ("vap3", "--model")


@pytest.mark.parametrize("other, message", [
    (dict(classes=10), "different datasets (num_classes 100 vs 10)"),
    (dict(manifest={"data": {"fingerprint": "other"}}), "fingerprint"),
])
def test_different_datasets_are_refused_in_one_line(tmp_path, monkeypatch, capsys, other, message):
    exps = _two(tmp_path, **other)
    if "manifest" in other:
        exps["sgd"].manifest = {"data": {"fingerprint": "first"}}
    _serve(monkeypatch, exps)
    assert compare.main([str(tmp_path / "sgd"), str(tmp_path / "adamw"), "--out", str(tmp_path / "cmp")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot compare sgd and adamw" in err[0] and message in err[0]
    assert not (tmp_path / "cmp").exists()


def test_a_metric_one_experiment_lacks_is_refused(tmp_path, monkeypatch, capsys):
    exps = _two(tmp_path)
    exps["adamw"].trials = exps["adamw"].trials.drop(columns=["val_top1_error"])
    _serve(monkeypatch, exps)
    argv = [str(tmp_path / "sgd"), str(tmp_path / "adamw"), "--metric", "val_top1_error", "--out", str(tmp_path / "c")]
    assert compare.main(argv) == 2
    assert "does not report val_top1_error" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["a"], "at least two experiment directories"),
    (["a", "b", "--labels", "x"], "--labels gives 1 names for 2 experiments"),
    (["a", "b", "--labels", "x", "x"], "labels must differ"),
])
def test_bad_arguments_are_one_line_errors(tmp_path, capsys, argv, message):
    assert compare.main(argv + ["--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_help_is_fast_and_shows_defaults():
    start = time.monotonic()
    # A wide terminal and whitespace folded: argparse wraps at $COLUMNS, which a user may export.
    proc = subprocess.run([sys.executable, "-m", "analysis.compare", "--help"], capture_output=True, text=True,
                          cwd=REPO, timeout=60, env={**os.environ, "COLUMNS": "250"})
    took = time.monotonic() - start
    text = " ".join(proc.stdout.split())
    assert proc.returncode == 0 and "(default: auto)" in text and "(default: 200)" in text
    # The whole description, not its first line cut mid-sentence.
    assert "compare.md, each law with its warnings." in text and "refused in one line." in text
    assert took < 2.0, f"--help took {took:.1f} s"


@pytest.mark.slow
def test_two_real_smoke_experiments(smoke_experiment, tmp_path):
    """The issue's check: `python -m analysis.compare A B` on two smoke experiments writes its files."""
    copy = tmp_path / "smoke-again"
    shutil.copytree(smoke_experiment, copy)
    out = tmp_path / "cmp"
    proc = subprocess.run([sys.executable, "-m", "analysis.compare", str(smoke_experiment), str(copy),
                           "--include-unlearned", "--out", str(out)], capture_output=True, text=True, cwd=REPO,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert {p.name for p in out.iterdir()} >= {"compare.png", "compare.csv", "compare.md"}
    table = pd.read_csv(out / "compare.csv")
    assert set(table["experiment"]) == {smoke_experiment.name, copy.name}
