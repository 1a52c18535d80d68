"""analysis.compare: several sweeps on one figure, compare.csv holding each one's own numbers,
compare.md, and one-line refusals of experiments that cannot be compared."""

from __future__ import annotations

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

from analysis import compare
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
