"""analysis.results and analysis.plot_scaling: on the smoke sweep's real Tune experiment, and on
hand-made tables with a known law for the fit path a 2-fraction sweep cannot reach."""

from __future__ import annotations

import json
import math
import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from analysis import plot_scaling
from analysis import results as R
from analysis.fit import fit_power_law
from raysweep.errors import RaysweepError

# The real Tune experiment the slow tests read (the lead's smoke sweep, tests/conftest.py).
EXPERIMENT_FIXTURE = "smoke_experiment"


@pytest.fixture(scope="session")
def experiment(request) -> Path:
    return request.getfixturevalue(EXPERIMENT_FIXTURE)


def fake_experiment(path: Path) -> R.Experiment:
    """The tables load_experiment makes, for a sweep whose errors follow a known law.

    5 fractions of 50,000 x 3 seeds, test top-5 error 2·n^-0.35 + 0.05 with 0.5% noise, one
    errored and one unlearned trial; for the CLI's fit path, which the 2-fraction smoke
    sweep cannot reach.
    """
    rng = np.random.default_rng(0)
    trials, epochs = [], []
    for fraction in (1.0, 0.5, 0.25, 0.125, 0.0625):
        for seed in (0, 1, 2):
            n = int(50_000 * fraction)
            err = (2 * n ** -0.35 + 0.05) * math.exp(rng.normal(0, 0.005))
            tid = f"t{len(trials):02d}"
            errored, unlearned = (fraction, seed) == (0.0625, 2), (fraction, seed) == (0.125, 2)
            final = np.nan if errored else 0.95 if unlearned else err
            trials.append(dict(trial_id=tid, fraction=fraction, seed=seed, status="ERROR" if errored else "TERMINATED",
                               n_train=n, epochs=3, best_epoch=pd.NA if errored else 3,
                               learned=pd.NA if errored else not unlearned, val_loss=1 + final,
                               val_top1_error=min(1, 2 * final), val_top5_error=final * 1.01, test_loss=1 + final,
                               test_top1_error=min(1, 2 * final), test_top5_error=final, time_total_s=60.0,
                               error="RuntimeError: boom" if errored else "", path=str(path / tid)))
            for epoch in (1, 2, 3):
                epochs.append(dict(trial_id=tid, fraction=fraction, seed=seed, n_train=n, epoch=epoch,
                                   train_loss=4.0 / epoch, val_top5_error=min(1.0, final * (1 + 1 / epoch))))
    trials = pd.DataFrame(trials)
    trials["best_epoch"] = trials["best_epoch"].astype("Int64")
    trials["learned"] = trials["learned"].astype("boolean")
    trials["excluded"] = [R._exclusion(row) for row in trials.itertuples()]
    return R.Experiment(path=path, trials=trials, epochs=pd.DataFrame(epochs),
                        config={"name": "fake", "description": "known law"})


def _result_rows(trial_dir: Path) -> list[dict]:
    """A trial's reports straight from Tune's result.json: the independent reading to compare with."""
    text = (trial_dir / "result.json").read_text().strip()
    return [json.loads(line) for line in text.splitlines()] if text else []


@pytest.mark.slow
def test_tables_hold_every_trial_and_epoch(experiment):
    exp = R.load_experiment(experiment)
    trials, epochs = exp.trials, exp.epochs
    assert trials["trial_id"].is_unique
    assert not trials.duplicated(["fraction", "seed"]).any()  # one trial per grid point
    assert (set(trials.columns) >= {"fraction", "seed", "n_train", "best_epoch", "learned", "status", "trial_id",
                                    "val_loss", "val_top1_error", "val_top5_error", "test_loss",
                                    "test_top1_error", "test_top5_error", "time_total_s", "excluded"})
    for t in trials.itertuples():
        rows = _result_rows(Path(t.path))
        assert rows, f"trial {t.trial_id} has no reports"
        last = rows[-1]
        assert (t.fraction, t.seed) == (last["config"]["fraction"], last["config"]["seed"])
        assert t.n_train == last["n_train"]
        assert t.time_total_s == pytest.approx(last["time_total_s"])
        by_epoch = {r["epoch"]: r for r in rows}  # a retried epoch counts once, as last reported
        mine = epochs[epochs["trial_id"] == t.trial_id]
        assert list(mine["epoch"]) == sorted(by_epoch)
        assert list(mine["val_top5_error"]) == pytest.approx([by_epoch[e]["val_top5_error"] for e in sorted(by_epoch)])
        assert list(mine["train_loss"]) == pytest.approx([by_epoch[e]["train_loss"] for e in sorted(by_epoch)])
        if t.status == "TERMINATED":
            assert t.test_top5_error == pytest.approx(last["test_top5_error"])
            assert t.learned == last["learned"] and t.best_epoch == last["best_epoch"]
            # val_* beside the test metrics are those of the tested (best) epoch
            best = next(r for r in rows if r["epoch"] == last["best_epoch"])
            assert t.val_top5_error == pytest.approx(best["val_top5_error"])
            assert t.val_top5_error == pytest.approx(last["best_val_top5_error"])
        else:
            assert t.excluded and pd.isna(t.test_top5_error)
    cfg = exp.config
    assert exp.name == cfg["name"] and sorted(trials["fraction"].unique()) == sorted(cfg["sweep"]["fractions"])
    assert sorted(trials["seed"].unique()) == sorted(cfg["sweep"]["seeds"])


def _table(**cols) -> pd.DataFrame:
    base = dict(trial_id=[f"t{i}" for i in range(4)], fraction=[0.5, 0.5, 1.0, 1.0], seed=[0, 1, 0, 1],
                n_train=[5, 5, 10, 10], test_top5_error=[0.5, 0.6, 0.4, 0.3])
    return pd.DataFrame({**base, **cols})


def test_trials_for_fit_leaves_out_errored_unfinished_and_unlearned():
    trials = _table(excluded=["errored", "unfinished (RUNNING)", "did not learn", ""])
    with pytest.warns(UserWarning, match=r"3 of 4 trials left out of the fit: 1 did not learn, 1 errored, "
                                         r"1 unfinished \(RUNNING\) \(--include-unlearned"):
        used = R.trials_for_fit(trials)
    assert list(used["trial_id"]) == ["t3"]
    with pytest.warns(UserWarning, match="2 of 4 trials left out"):
        used = R.trials_for_fit(trials, include_unlearned=True)
    assert list(used["trial_id"]) == ["t2", "t3"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing left out: no warning
        assert len(R.trials_for_fit(_table(excluded=[""] * 4))) == 4


def test_per_fraction_summary_statistics():
    trials = _table()
    summary = R.per_fraction_summary(trials.iloc[[0, 2, 3]], trials, metrics=["test_top5_error"])
    half = summary.set_index("fraction").loc[0.5]
    full = summary.set_index("fraction").loc[1.0]
    assert (half["n_seeds"], half["n_left_out"], full["n_seeds"], full["n_left_out"]) == (1, 1, 2, 0)
    assert half["test_top5_error_mean"] == 0.5 and pd.isna(half["test_top5_error_std"])
    assert full["test_top5_error_mean"] == pytest.approx(0.35)
    assert full["test_top5_error_std"] == pytest.approx(np.std([0.4, 0.3], ddof=1))
    t = 12.706204736174698  # Student t, 97.5%, 1 degree of freedom
    assert full["test_top5_error_ci_high"] == pytest.approx(min(1.0, 0.35 + t * 0.0707106781 / np.sqrt(2)))
    assert full["test_top5_error_ci_low"] == 0.0  # clipped: an error is never negative


def test_a_folder_that_is_not_an_experiment_is_named(tmp_path, capsys):
    with pytest.raises(RaysweepError, match=f"{tmp_path} is not a Ray Tune experiment directory"):
        R.load_experiment(tmp_path)
    with pytest.raises(RaysweepError, match="does not exist"):
        R.load_experiment(tmp_path / "missing")
    assert plot_scaling.main([str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("raysweep: error:") and "missing" in err[0]


def _check_outputs(out: Path, exp: R.Experiment, used: pd.DataFrame, metric: str = "test_top5_error") -> dict:
    """Every file is there, complete, and holds the trials' own numbers."""
    names = {"scaling.png", "scaling.svg", "curves.png", "summary.csv", "fit.json", "report.md"}
    assert {p.name for p in out.iterdir()} == names  # and no temp files left behind
    for png in ("scaling.png", "curves.png"):
        with Image.open(out / png) as im:
            im.load()
            assert im.width > 800 and im.height > 500
            assert np.asarray(im.convert("L")).std() > 10  # something is drawn, not a blank canvas
    assert (out / "scaling.svg").read_text().rstrip().endswith("</svg>")

    summary = pd.read_csv(out / "summary.csv")
    assert sorted(summary["fraction"]) == sorted(exp.trials["fraction"].unique())
    for row in summary.itertuples():
        mine = used[used["fraction"] == row.fraction]
        assert row.n_seeds == len(mine)
        assert row.n_left_out == (exp.trials["fraction"] == row.fraction).sum() - len(mine)
        for m in R.ERROR_METRICS:
            values = mine[m].astype(float)
            if len(values):
                assert getattr(row, f"{m}_mean") == pytest.approx(values.mean())
            if len(values) > 1:
                assert getattr(row, f"{m}_std") == pytest.approx(values.std(ddof=1))
                assert getattr(row, f"{m}_ci_low") <= values.mean() <= getattr(row, f"{m}_ci_high")

    doc = json.loads((out / "fit.json").read_text())
    assert doc["trials"] == len(exp.trials) and doc["trials_used"] == len(used) and doc["metric"] == metric
    report = (out / "report.md").read_text()
    for link in ("(scaling.png)", "(curves.png)", "(summary.csv)", "(fit.json)"):
        assert link in report
    for n in summary["n_train"].dropna():
        assert f"{int(n):,}" in report
    # An independent fit of the used trials' points: its parameters, or its own error as the reason.
    try:
        fit, reason = fit_power_law(used["n_train"], used[metric]), None
    except RaysweepError as err:
        fit, reason = None, "no usable trials: every trial was left out of the fit" if used.empty else str(err)
    if fit is not None:
        assert doc["fit"]["alpha"] == pytest.approx(fit.alpha, rel=1e-6)
        assert doc["fit"]["c"] == pytest.approx(fit.c, abs=1e-9)
        assert doc["fit"]["formula"] in report
        lo, hi = doc["intervals"]["alpha_ci"]
        assert lo < hi
    else:
        assert doc["fit"] is None and doc["no_fit_reason"] == reason
        assert f"No fit: {reason}" in report
    return doc


@pytest.mark.slow
@pytest.mark.parametrize("include_unlearned", [False, True])
def test_plot_scaling_on_the_experiment(experiment, tmp_path, capsys, include_unlearned):
    # A copy, so the default output folder (EXPERIMENT_DIR/analysis) lands in tmp_path.
    exp_dir = tmp_path / experiment.name
    shutil.copytree(experiment, exp_dir)
    argv = [str(exp_dir), "--bootstrap", "100", "--target-error", "0.2"]
    assert plot_scaling.main(argv + (["--include-unlearned"] if include_unlearned else [])) == 0
    printed = capsys.readouterr()
    exp = R.load_experiment(exp_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        used = R.trials_for_fit(exp.trials, include_unlearned=include_unlearned)
    _check_outputs(exp_dir / "analysis", exp, used)
    assert "law (test_top5_error):" in printed.out and "fraction" in printed.out
    if len(used) < len(exp.trials):
        assert f"{len(exp.trials) - len(used)} of {len(exp.trials)} trials left out" in printed.err


def test_plot_scaling_fits_a_known_law(tmp_path, monkeypatch, capsys):
    exp = fake_experiment(tmp_path / "fake")
    monkeypatch.setattr(R, "load_experiment", lambda path: exp)
    out = tmp_path / "out"
    assert plot_scaling.main([str(exp.path), "--out", str(out), "--bootstrap", "200",
                              "--target-error", "0.1", "0.04"]) == 0
    printed = capsys.readouterr()
    assert "2 of 15 trials left out of the fit: 1 did not learn, 1 errored" in printed.err
    used = exp.trials[exp.trials["excluded"] == ""]
    doc = _check_outputs(out, exp, used)
    assert doc["left_out"] == {"errored": 1, "did not learn": 1}
    assert doc["fit"]["alpha"] == pytest.approx(0.35, abs=0.05)
    assert doc["fit"]["c"] == pytest.approx(0.05, abs=0.01)
    lo, hi = doc["intervals"]["alpha_ci"]
    assert lo <= doc["fit"]["alpha"] <= hi
    assert doc["holdout"]["n_heldout"] == 50_000 and abs(doc["holdout"]["rel_error"]) < 0.05
    assert doc["holdout"]["observed"] == pytest.approx(used.loc[used["n_train"] == 50_000, "test_top5_error"].mean())
    reach, below_c = doc["targets"]
    truth = (2 / (0.1 - 0.05)) ** (1 / 0.35)  # where the generating law reaches 10%
    assert reach["reachable"] and reach["n"] == pytest.approx(truth, rel=0.15)
    assert reach["interval"][0] <= reach["n"] <= reach["interval"][1]
    assert below_c["target"] == 0.04 and not below_c["reachable"] and below_c["n"] is None
    assert "error 4%: not reachable" in printed.out and "error 4%: not reachable" in (out / "report.md").read_text()


def test_plot_scaling_without_a_fit_still_writes_everything(tmp_path, monkeypatch, capsys):
    """Two sizes (as in a smoke sweep) cannot fit a law: the plots and table still come out."""
    exp = fake_experiment(tmp_path / "fake")
    keep = exp.trials["n_train"] >= 25_000
    exp.trials = exp.trials[keep].reset_index(drop=True)
    exp.epochs = exp.epochs[exp.epochs["trial_id"].isin(exp.trials["trial_id"])]
    monkeypatch.setattr(R, "load_experiment", lambda path: exp)
    out = tmp_path / "out"
    assert plot_scaling.main([str(exp.path), "--out", str(out)]) == 0
    doc = _check_outputs(out, exp, exp.trials)
    assert doc["fit"] is None and doc["holdout"] is None and doc["targets"] == []
    assert "no fit: power-law fit needs at least 3 distinct" in capsys.readouterr().out


def test_plot_scaling_with_zero_errors(tmp_path, monkeypatch, capsys):
    """Top-5 error is 0 with <= 5 classes (the smoke sweep's 4): no log axis, no fit, still every file."""
    exp = fake_experiment(tmp_path / "fake")
    for m in ("val_top5_error", "test_top5_error"):
        exp.trials[m] = exp.trials[m].where(exp.trials[m].isna(), 0.0)
    exp.epochs["val_top5_error"] = 0.0
    monkeypatch.setattr(R, "load_experiment", lambda path: exp)
    out = tmp_path / "out"
    assert plot_scaling.main([str(exp.path), "--out", str(out)]) == 0
    doc = _check_outputs(out, exp, exp.trials[exp.trials["excluded"] == ""])
    assert "is 0; errors must lie in (0, 1]" in doc["no_fit_reason"]
    assert "no fit: power-law fit: error at point 0" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--target-error", "5"], "--target-error 5 must be an error fraction in (0, 1]"),
    (["--bootstrap", "-1"], "--bootstrap must be >= 0"),
])
def test_bad_options_are_one_line_errors(tmp_path, capsys, argv, message):
    assert plot_scaling.main([str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
