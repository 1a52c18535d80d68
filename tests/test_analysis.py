"""analysis.results and analysis.plot_scaling: on the smoke sweep's real Tune experiment, and on
hand-made tables with a known law for the fit path a 2-fraction sweep cannot reach."""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
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


def modern_experiment(path: Path, *, fractions=(1.0, 0.5, 0.25, 0.125, 0.0625), seeds=(0, 1, 2), noise=0.005,
                      classes=100, stopped_early=True, steps_equal=True, manifest=None) -> R.Experiment:
    """A clean sweep as trials report it now: early stopping (best epoch 4 of 6), the same number
    of optimizer steps at every size (the steps budget), per-epoch timings, the model and its
    size, and top-1 error 3·n^-0.35 + 0.1 (top-5: half of it)."""
    rng = np.random.default_rng(1)
    trials, epochs = [], []
    for fraction in fractions:
        for seed in seeds:
            n = int(50_000 * fraction)
            top1 = (3 * n ** -0.35 + 0.1) * math.exp(rng.normal(0, noise))
            tid = f"m{len(trials):02d}"
            last = 6
            steps = 6_000 if steps_equal else 6 * math.ceil(n / 128)
            trials.append(dict(trial_id=tid, fraction=fraction, seed=seed, status="TERMINATED", n_train=n, epochs=last,
                               best_epoch=4 if stopped_early else last, learned=True, val_loss=1.0,
                               val_top1_error=top1 * 1.01, val_top5_error=top1 / 2, test_loss=1.0,
                               test_top1_error=top1, test_top5_error=top1 / 2, best_val_top5_error=top1 / 2,
                               time_total_s=60.0, error="", path=str(path / tid), steps=steps,
                               select_metric="val_top1_error" if classes < 50 else "val_top5_error",
                               best_val_error=top1, stopped_early=stopped_early, max_epochs=30, num_classes=classes,
                               num_params=2_470_000, model="alexnet(width=0.25)", wall_time_s=60.0))
            for epoch in range(1, last + 1):
                epochs.append(dict(trial_id=tid, fraction=fraction, seed=seed, n_train=n, epoch=epoch,
                                   train_loss=4.0 / epoch, val_top1_error=min(1.0, top1 * (1 + 1 / epoch)),
                                   val_top5_error=min(1.0, top1 / 2 * (1 + 1 / epoch)),
                                   steps=steps * epoch // last, time_train_s=n / 1000, time_eval_s=0.5,
                                   time_checkpoint_s=0.3 if epoch % 3 == 0 else 0.0,
                                   time_epoch_s=n / 1000 + 0.5 + (0.3 if epoch % 3 == 0 else 0.0) + 0.1,
                                   checkpointed=epoch % 3 == 0, time_to_first_step_s=5.0, time_startup_s=3.0,
                                   time_data_load_s=1.5))
    trials = pd.DataFrame(trials)
    trials["best_epoch"] = trials["best_epoch"].astype("Int64")
    trials["learned"] = trials["learned"].astype("boolean")
    trials["excluded"] = [R._exclusion(row) for row in trials.itertuples()]
    config = {"name": "modern", "description": "clean sweep", "model": {"name": "alexnet", "width": 0.25},
              "train": {"batch_size": 128, "budget": "steps"}, "data": {"source": "synthetic"}}
    return R.Experiment(path=path, trials=trials, epochs=pd.DataFrame(epochs), config=config, manifest=manifest)


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
        assert t.width == R.trial_width(last["config"], exp.config)  # the param, else the config's model.width
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
    metric, _ = R.resolve_metric(exp)  # the rule: top-1 for the smoke sweep's 4 classes
    assert metric == ("test_top1_error" if exp.trial_value("num_classes") is not None else "test_top5_error")
    doc = _check_outputs(exp_dir / "analysis", exp, used, metric)
    assert f"law ({metric}, pow3):" in printed.out and "fraction" in printed.out
    # The smoke trials report where their time went: the report has the table, fit.json the rows.
    if "time_epoch_s" in exp.epochs:
        assert doc["time"] and {r["fraction"] for r in doc["time"]} == set(exp.trials["fraction"])
        assert "| fraction | n_train | trials | epochs | training |" in (exp_dir / "analysis" / "report.md").read_text()
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


# --- the report judges its own evidence, states its metric, model and time --------------------

def _judge(exp: R.Experiment, n_boot: int = 50, model: str = "pow3") -> tuple[dict, list]:
    from analysis import evidence

    used = R.trials_for_fit(exp.trials)
    metric, _ = R.resolve_metric(exp)
    result = plot_scaling.analyse(used, metric, [], n_boot, model=model)
    return result, evidence.judge(used, result, exp.config)


def _codes(found) -> list[str]:
    return [w.code for w in found]


def test_a_clean_sweep_earns_no_warning_and_the_report_says_so(tmp_path, monkeypatch, capsys):
    exp = modern_experiment(tmp_path / "modern")
    assert _codes(_judge(exp)[1]) == []
    monkeypatch.setattr(R, "load_experiment", lambda path: exp)
    out = tmp_path / "out"
    assert plot_scaling.main([str(exp.path), "--out", str(out), "--bootstrap", "100"]) == 0
    assert "warning: " not in capsys.readouterr().err
    doc = json.loads((out / "fit.json").read_text())
    assert doc["warnings"] == []
    assert "**No warnings.**" in (out / "report.md").read_text()


@pytest.mark.parametrize("change, code, words", [
    (dict(stopped_early=False), "undertrained", "best epoch is the last one in 15/15 trials that were not stopped"),
    (dict(fractions=(1.0, 0.7, 0.5, 0.35)), "few_sizes", "4 sizes spanning 2.9x (thresholds: at least 5 sizes"),
    (dict(seeds=(0, 1)), "few_seeds", "fewer than 3 seeds (2 at n = 3,125"),
    (dict(noise=0.25), "wide_alpha_ci", "wider than alpha itself"),
])
def test_each_weakness_of_the_trials_earns_its_warning(tmp_path, change, code, words):
    found = _judge(modern_experiment(tmp_path / "x", **change))[1]
    assert code in _codes(found), _codes(found)
    assert words in next(w.message for w in found if w.code == code)


def test_unequal_optimisation_needs_both_the_steps_and_the_cap(tmp_path):
    # The epochs budget: ~16x the steps at the largest size. Warned only where trials hit their cap.
    capped = modern_experiment(tmp_path / "a", steps_equal=False, stopped_early=False)
    message = next(w.message for w in _judge(capped)[1] if w.code == "unequal_optimisation")
    assert "n = 50,000 had 15.6x the optimizer steps of n = 3,125 (threshold 2x)" in message  # 391 / 25 batches
    assert "15/15 trials ended at their epoch cap" in message
    converged = modern_experiment(tmp_path / "b", steps_equal=False, stopped_early=True)
    assert "unequal_optimisation" not in _codes(_judge(converged)[1])
    # Older experiments report no steps: epochs x batches per epoch from the config's batch size.
    old = modern_experiment(tmp_path / "c", steps_equal=False, stopped_early=False)
    old.trials = old.trials.drop(columns=["steps", "stopped_early"])
    assert "unequal_optimisation" in _codes(_judge(old)[1])


def test_a_held_out_miss_is_a_warning(tmp_path):
    exp = modern_experiment(tmp_path / "x")
    largest = exp.trials["n_train"] == 50_000
    exp.trials.loc[largest, "test_top5_error"] += 0.05  # the largest size does 5 points worse
    result, found = _judge(exp)
    message = next(w.message for w in found if w.code == "holdout_miss")
    assert f"{100 * result['holdout']['abs_error']:+.2f} points; threshold ±2 points" in message


def test_c_pinned_at_its_bound_is_a_warning(tmp_path):
    exp = modern_experiment(tmp_path / "x")
    # The error stops falling after n = 12,500 and rises a little: the plateau wants to sit above min(err).
    level = {50_000: 0.25, 25_000: 0.25, 12_500: 0.2, 6_250: 0.3, 3_125: 0.5}
    exp.trials["test_top5_error"] = exp.trials["n_train"].map(level) * np.tile([1, 1.01, 0.99], 5)
    result, found = _judge(exp)
    assert result["_fit"].c_at_bound and "c_at_bound" in _codes(found)


def test_another_family_that_extrapolates_clearly_better_is_named(tmp_path, monkeypatch, capsys):
    from analysis import curves as C

    exp = modern_experiment(tmp_path / "x", fractions=tuple(2.0 ** -np.arange(6)))
    n = exp.trials["n_train"].to_numpy(float)
    exp.trials["test_top5_error"] = C.get_model("exp3").predict((0.5, 8000.0, 0.1), n * 51_200 / 50_000 / 8) \
        * np.exp(np.random.default_rng(0).normal(0, 0.01, n.size))
    result, found = _judge(exp)
    assert result["better_model"]["name"] in {"exp3", "mmf4", "pow4"}
    assert "better_model" in _codes(found)
    monkeypatch.setattr(R, "load_experiment", lambda path: exp)
    assert plot_scaling.main([str(exp.path), "--out", str(tmp_path / "out"), "--bootstrap", "50"]) == 0
    report = (tmp_path / "out" / "report.md").read_text()
    assert f"**{result['better_model']['name']} extrapolates clearly better than pow3**" in report
    assert "better_model" in capsys.readouterr().err
    doc = json.loads((tmp_path / "out" / "fit.json").read_text())
    names = [m["name"] for m in doc["models"]]
    assert sorted(names) == sorted(C.MODEL_NAMES)
    for m in doc["models"]:
        assert {"name", "params", "rmse_log", "aic", "bic", "extrapolation_error"} <= set(m)
    # The table is ranked by BIC and every row's numbers are the fit.json's.
    assert [m["bic"] for m in doc["models"]] == sorted(m["bic"] for m in doc["models"])


@pytest.mark.parametrize("classes, metric", [(10, "test_top1_error"), (100, "test_top5_error")])
def test_the_metric_rule_picks_top1_below_50_classes(tmp_path, monkeypatch, classes, metric):
    exp = modern_experiment(tmp_path / "x", classes=classes)
    monkeypatch.setattr(R, "load_experiment", lambda path: exp)
    out = tmp_path / "out"
    assert plot_scaling.main([str(exp.path), "--out", str(out), "--bootstrap", "20"]) == 0
    doc = json.loads((out / "fit.json").read_text())
    assert doc["metric"] == metric
    report = (out / "report.md").read_text()
    assert f"Fitted metric: `{metric}`: the rule is top-5 error with 50 or more classes, else top-1" in report
    assert f"this dataset has {classes} classes" in report
    assert "Model: `alexnet(width=0.25)`, 2,470,000 parameters." in report
    assert doc["trained_model"] == {"name": "alexnet(width=0.25)", "num_params": 2_470_000}


def test_where_the_time_went_per_fraction(tmp_path):
    from analysis import timing

    exp = modern_experiment(tmp_path / "x", fractions=(1.0, 0.5, 0.25))
    # Trial m00 was interrupted after epoch 3 and resumed: its later epochs are a second attempt.
    later = (exp.epochs["trial_id"] == "m00") & (exp.epochs["epoch"] > 3)
    exp.epochs.loc[later, ["time_to_first_step_s", "time_startup_s", "time_data_load_s"]] = [7.0, 4.0, 2.0]
    # The last epoch also tests the best weights, inside its wall time: that is evaluation too.
    exp.epochs["time_test_s"] = np.where(exp.epochs["epoch"] == 6, 0.25, np.nan)
    exp.epochs["time_epoch_s"] += exp.epochs["time_test_s"].fillna(0.0)
    table, reason = timing.time_table(exp.epochs)
    assert reason is None
    row = table.set_index("fraction").loc[1.0]
    assert row["training_s"] == pytest.approx(3 * 6 * 50.0)  # 3 seeds x 6 epochs x 50 s
    assert row["evaluation_s"] == pytest.approx(3 * 6 * 0.5 + 3 * 0.25)
    assert row["checkpoints_s"] == pytest.approx(3 * 2 * 0.3)
    assert row["reporting_s"] == pytest.approx(3 * 6 * 0.1)
    assert row["start-up_s"] == pytest.approx(5.0 + 7.0 + 5.0 + 5.0)  # m00 started twice
    assert row["data_load_s"] == pytest.approx(1.5 + 2.0 + 1.5 + 1.5)
    shares = [row[f"{p}_share"] for p in timing.PARTS]
    assert sum(shares) == pytest.approx(1.0) and row["total_s"] == pytest.approx(
        sum(row[f"{p}_s"] for p in timing.PARTS))
    # An experiment from before the timings: no table, and the reason names what is missing.
    table, reason = timing.time_table(exp.epochs.drop(columns=["time_epoch_s"]))
    assert table is None and "do not report time_epoch_s" in reason


def test_the_report_shows_time_and_how_to_reproduce(tmp_path, monkeypatch):
    manifest = {"command": "python -m raysweep.tune --config configs/demo.yaml", "config_hash": "sha256:abc",
                "git": {"commit": "0123abc", "dirty": True}, "started_at": "2026-01-01T00:00:00+00:00",
                "ended_at": "2026-01-01T00:05:00+00:00", "attempts": [{}, {}],
                "environment": {"versions": {"python": "3.11.7", "ray": "2.60.0"}, "os": "Linux", "cpu_model": "EPYC",
                                "cpu_count": 2, "gpus": []},
                "data": {"source": "synthetic", "fingerprint": "f00d", "counts": {"train": 800, "test": 200}}}
    exp = modern_experiment(tmp_path / "x", manifest=manifest)
    monkeypatch.setattr(R, "load_experiment", lambda path: exp)
    out = tmp_path / "out"
    assert plot_scaling.main([str(exp.path), "--out", str(out), "--bootstrap", "20"]) == 0
    report = (out / "report.md").read_text()
    time_part = report.split("## Where the time went")[1].split("##")[0]
    assert "| fraction | n_train | trials | epochs | training | evaluation | checkpoints | reporting | start-up |" \
        in time_part
    assert "| 1 | 50,000 | 3 | 18 | 900.0 s (97%) | 9.0 s (1%) | 1.8 s (0%) | 1.8 s (0%) | 15.0 s (2%) |" in time_part
    repro = report.split("## Reproduce this")[1]
    assert "git checkout 0123abc" in repro and "uncommitted changes" in repro
    assert "python -m raysweep.tune --config configs/demo.yaml   # as it was run" in repro
    assert "fingerprint `f00d`, train 800, test 200" in repro and "(2 attempt(s))" in repro
    from raysweep.console import python_command

    again = python_command("-m", "raysweep.tune", "--config", exp.path / "raysweep_config.json", "--name", "x-again")
    assert f"{again}   # the exact resolved config" in repro, "the interpreter that wrote the report, not a bare python"
    doc = json.loads((out / "fit.json").read_text())
    assert [r["fraction"] for r in doc["time"]] == [0.0625, 0.125, 0.25, 0.5, 1.0]


def test_an_older_experiment_degrades_gracefully(tmp_path, monkeypatch):
    exp = fake_experiment(tmp_path / "fake")  # no timings, classes, model, steps or manifest
    monkeypatch.setattr(R, "load_experiment", lambda path: exp)
    out = tmp_path / "out"
    assert plot_scaling.main([str(exp.path), "--out", str(out), "--bootstrap", "20"]) == 0
    report = (out / "report.md").read_text()
    assert "the trials do not report their number of classes" in report
    assert "Not shown: the trials do not report time_train_s" in report
    assert "No manifest.json" in report and "Model: not recorded." in report


def test_help_is_fast_and_shows_defaults():
    import subprocess
    import sys
    import time

    start = time.monotonic()
    # A wide terminal and whitespace folded: argparse wraps at $COLUMNS, which a user may export.
    proc = subprocess.run([sys.executable, "-m", "analysis.plot_scaling", "--help"], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parent.parent, timeout=60,
                          env={**os.environ, "COLUMNS": "250"})
    took = time.monotonic() - start
    text = " ".join(proc.stdout.split())
    assert proc.returncode == 0 and "(default: auto)" in text and "(default: pow3)" in text
    assert took < 2.0, f"--help took {took:.1f} s"


def test_trials_stopped_while_their_training_loss_still_fell_are_a_warning(tmp_path):
    exp = modern_experiment(tmp_path / "x", stopped_early=True)
    exp.trials["train_loss_slope"] = 0.001  # flat: stopped at a real plateau
    assert "stopped_while_falling" not in _codes(_judge(exp)[1])
    largest = exp.trials["n_train"] == 50_000
    exp.trials.loc[largest, "train_loss_slope"] = 0.08
    message = next(w.message for w in _judge(exp)[1] if w.code == "stopped_while_falling")
    assert message.startswith("3 trial(s) stopped early while their training loss still fell faster than "
                              "0.02 nats/epoch (3 at n = 50,000)")
