"""analysis.joint (Rosenfeld et al.'s joint law over n and model size m): known parameters recovered
from data the form generates, the bootstrap's intervals, the held-out checks, the refusal of a
one-width grid; and plot_scaling end to end on a fraction × width × seed sweep."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from analysis import joint as J
from analysis import plot_scaling
from analysis import results as R
from raysweep.errors import RaysweepError

TRUE = (2.5, 0.3, 30.0, 0.35, 0.05)  # a, alpha, b, beta, c
EPS0 = 0.95  # top-5 of 100 classes
SIZES = (625, 1250, 2500, 5000, 10_000, 20_000)
PARAMS = (120_000, 480_000, 1_920_000, 7_680_000)


def grid_points(seeds: int = 3, noise: float = 0.01, eps0: float | None = None, sizes=SIZES, params=PARAMS,
                seed: int = 0):
    """Every (n, m) cell × `seeds` trials, errors from the law with multiplicative noise `noise`."""
    rng = np.random.default_rng(seed)
    n, m = (a.ravel() for a in np.meshgrid(sizes, params))
    n, m = np.repeat(n, seeds).astype(float), np.repeat(m, seeds).astype(float)
    return n, m, J.law(TRUE, n, m, eps0) * np.exp(rng.normal(0, noise, n.size))


def width_experiment(path: Path, *, widths=(0.125, 0.25, 0.5, 1.0), fractions=(1.0, 0.5, 0.25, 0.125, 0.0625),
                     seeds=(0, 1, 2), noise=0.01) -> R.Experiment:
    """The tables load_experiment makes for a fraction × width × seed sweep of 100 classes whose
    top-5 error follows the law in its envelope (eps0 0.95); num_params grows as width^1.9."""
    rng = np.random.default_rng(2)
    trials, epochs = [], []
    for fraction in fractions:
        for width in widths:
            for seed in seeds:
                n, m = int(20_000 * fraction), int(3_840_000 * width ** 1.9)
                top5 = float(J.law(TRUE, n, m, EPS0)) * math.exp(rng.normal(0, noise))
                tid = f"w{len(trials):03d}"
                trials.append(dict(trial_id=tid, fraction=fraction, width=width, seed=seed, status="TERMINATED",
                                   n_train=n, epochs=6, best_epoch=4, learned=True, val_loss=1.0,
                                   val_top1_error=min(1.0, 1.6 * top5), val_top5_error=top5 * 1.01, test_loss=1.0,
                                   test_top1_error=min(1.0, 1.6 * top5), test_top5_error=top5,
                                   best_val_top5_error=top5, time_total_s=60.0, error="", path=str(path / tid),
                                   steps=6_000, select_metric="val_top5_error", best_val_error=top5,
                                   stopped_early=True, max_epochs=30, num_classes=100, num_params=m,
                                   model=f"alexnet(width={width:g})", wall_time_s=60.0))
                for epoch in range(1, 7):
                    epochs.append(dict(trial_id=tid, fraction=fraction, width=width, seed=seed, n_train=n,
                                       epoch=epoch, train_loss=4.0 / epoch, steps=1000 * epoch,
                                       val_top5_error=min(1.0, top5 * (1 + 1 / epoch))))
    trials = pd.DataFrame(trials)
    trials["best_epoch"] = trials["best_epoch"].astype("Int64")
    trials["learned"] = trials["learned"].astype("boolean")
    trials["excluded"] = [R._exclusion(row) for row in trials.itertuples()]
    config = {"name": "widths", "description": "a known joint law", "model": {"name": "alexnet", "width": 1.0},
              "train": {"batch_size": 128, "budget": "steps"}, "data": {"source": "synthetic"}}
    return R.Experiment(path=path, trials=trials, epochs=pd.DataFrame(epochs), config=config)


@pytest.mark.parametrize("eps0", [None, EPS0], ids=["plain", "envelope"])
def test_known_parameters_are_recovered(eps0):
    n, m, err = grid_points(eps0=eps0)
    fit = J.fit_joint(n, m, err, eps0)
    # 1% noise on 72 trials: over eight noise draws the exponents stayed within 0.03 of the truth and
    # c within 0.03; a and b trade off with c and with each other's exponent, so they get 35%.
    assert fit.alpha == pytest.approx(TRUE[1], abs=0.04) and fit.beta == pytest.approx(TRUE[3], abs=0.04)
    assert fit.a == pytest.approx(TRUE[0], rel=0.35) and fit.b == pytest.approx(TRUE[2], rel=0.35)
    assert fit.c == pytest.approx(TRUE[4], abs=0.04)
    # Whatever the trade-offs, the law itself is the generating one to within the noise (1% of ~50%).
    assert np.max(np.abs(fit.predict(n, m) - J.law(TRUE, n, m, eps0))) < 0.01
    assert fit.rmse_rel == pytest.approx(0.01, rel=0.3) and fit.at_bound == ()
    assert fit.envelope == (eps0 is not None) and fit.n_cells == len(SIZES) * len(PARAMS)
    if eps0 is not None:
        assert fit.eta == pytest.approx(eps0 / fit.a)


def test_the_envelope_is_the_papers_form():
    """u / sqrt(1 + (u/eps0)^2) with u in error units is eps0·|eps/(eps - i·eta)| with a = 1 and
    eta = eps0/a (the module's reparametrisation), checked against the complex modulus itself."""
    n, m = np.array([500.0, 5000.0, 50_000.0]), np.array([1e5, 1e6, 1e7])
    a, alpha, b, beta, c = TRUE
    eta = EPS0 / a
    eps = n ** -alpha + (b / a) * m ** -beta + c / a
    paper = EPS0 * np.abs(eps / (eps - 1j * eta))
    assert J.law(TRUE, n, m, EPS0) == pytest.approx(paper, rel=1e-12)
    assert (J.law(TRUE, n, m, EPS0) < EPS0).all() and J.random_guess_error("test_top5_error", 100) == EPS0


def test_the_bootstrap_intervals_hold_the_truth():
    n, m, err = grid_points(eps0=EPS0, seeds=5)
    boot = J.bootstrap_joint(n, m, err, EPS0, n_boot=200)
    assert boot.n_ok + boot.n_failed == 200 and boot.n_ok >= 190
    held = [lo <= t <= hi for t, (lo, hi) in zip(TRUE, (boot.interval(p) for p in J.PARAMS))]
    # A 95% interval misses its true value one time in twenty, and a bootstrap over five seeds a
    # cell runs a little narrow: "most" is at least 4 of the 5 (over six noise draws: 5, 5, 5, 3, 5, 5).
    assert sum(held) >= 4, held
    lo, hi = boot.interval("frontier_exponent")
    assert lo < TRUE[1] / TRUE[3] < hi
    band_lo, band_hi = boot.predict_interval(n[:3], m[:3])
    assert (band_lo <= boot.fit.predict(n[:3], m[:3]) + 1e-12).all() and (band_hi >= band_lo).all()


@pytest.mark.parametrize("params, message", [
    ((2_470_000,), "joint law needs at least 2 model widths; this grid has one (2,470,000 parameters)"),
    ((1e5, 1e6), None),
])
def test_one_width_is_refused_in_one_line(params, message):
    n, m, err = grid_points(params=params)
    if message is None:
        J.fit_joint(n, m, err)  # two widths are enough to fit (the evidence warns about it)
        return
    with pytest.raises(RaysweepError) as e:
        J.fit_joint(n, m, err)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_the_held_out_checks_predict_the_edges():
    n, m, err = grid_points(eps0=EPS0)
    for axis, edge in (("n", max(SIZES)), ("m", max(PARAMS))):
        h = J.holdout_joint(n, m, err, axis, EPS0)
        held = [c[0] if axis == "n" else c[1] for c in h.cells]
        assert set(held) == {edge} and len(h.cells) == (len(PARAMS) if axis == "n" else len(SIZES))
        for (cn, cm), obs in zip(h.cells, h.observed_each):
            assert obs == pytest.approx(err[(n == cn) & (m == cm)].mean())
        # Extrapolating one step along an axis from noise-1% data: well under a point of error.
        assert h.mean_abs_error < 0.01 and h.fit.n_points == np.sum((n if axis == "n" else m) < edge)
    # A widest model better than the law allows (by 5 points) is what the check must catch.
    worse = np.where(m == max(PARAMS), err - 0.05, err)
    assert J.holdout_joint(n, m, worse, "m", EPS0).mean_abs_error > 0.03


def test_a_held_out_check_without_enough_left_says_why():
    n, m, err = grid_points(sizes=SIZES[:3])
    with pytest.raises(RaysweepError, match="held-out check without the largest training-set size: power-law fit "
                                            "needs at least 3 distinct training-set sizes, got 2"):
        J.holdout_joint(n, m, err, "n")


def test_the_frontier_is_the_least_error_at_fixed_compute():
    from scipy.optimize import minimize_scalar

    for compute in (1e9, 1e11, 1e13):
        # At C = m·n, search log n for the least error; m* there must be the closed form's.
        res = minimize_scalar(lambda t: float(J.law(TRUE, math.exp(t), compute / math.exp(t), EPS0)),
                              bounds=(0, math.log(compute)), method="bounded", options={"xatol": 1e-10})
        n_star = math.exp(res.x)
        assert float(J.frontier(TRUE, n_star)) == pytest.approx(compute / n_star, rel=1e-4)


def test_a_trials_width_is_its_param_else_the_stored_config():
    assert R.trial_width({"fraction": 0.5, "seed": 0, "width": 0.25}, {"model": {"width": 1.0}}) == 0.25
    assert R.trial_width({"fraction": 0.5, "seed": 0}, {"model": {"width": 0.5}}) == 0.5
    assert R.trial_width({"fraction": 0.5, "seed": 0}, None) == 1.0  # an experiment without its config


# --- plot_scaling on a fraction × width × seed sweep ------------------------------------------

def _run(tmp_path, monkeypatch, exp, *extra, n_boot: int = 50) -> tuple[Path, dict, str]:
    monkeypatch.setattr(R, "load_experiment", lambda path: exp)
    out = tmp_path / "out"
    assert plot_scaling.main([str(exp.path), "--out", str(out), "--bootstrap", str(n_boot), *extra]) == 0
    return out, json.loads((out / "fit.json").read_text()), (out / "report.md").read_text()


def test_plot_scaling_fits_the_joint_law_of_a_width_grid(tmp_path, monkeypatch, capsys):
    exp = width_experiment(tmp_path / "widths")
    out, doc, report = _run(tmp_path, monkeypatch, exp)
    printed = capsys.readouterr().out
    assert {p.name for p in out.iterdir()} == set(plot_scaling.OUTPUTS + plot_scaling.JOINT_OUTPUTS)
    for png in plot_scaling.JOINT_OUTPUTS:
        with Image.open(out / png) as im:
            assert im.width > 1200 and im.height > 800
            assert np.asarray(im.convert("L")).std() > 10  # something is drawn
    joint = doc["joint"]
    fit, iv = joint["fit"], joint["intervals"]
    assert fit["envelope"] and fit["eps0"] == pytest.approx(EPS0) and fit["n_models"] == 4
    # 1% noise, 60 trials: the exponents within 0.05 of the law that made them, inside their intervals.
    for p, true in (("alpha", TRUE[1]), ("beta", TRUE[3])):
        assert fit[p] == pytest.approx(true, abs=0.05)
        assert iv[f"{p}_ci"][0] <= fit[p] <= iv[f"{p}_ci"][1]
    for axis in ("n", "m"):
        assert joint[f"holdout_{axis}"]["mean_abs_error"] < 0.01
        assert f"{100 * joint[f'holdout_{axis}']['mean_abs_error']:.2f} points" in report
    assert [r["width"] for r in joint["per_width"]] == [0.125, 0.25, 0.5, 1.0]
    # Error only falls with m in this law: the widest model is best at every n, and the frontier grows.
    assert {r["best_width"] for r in joint["best_on_grid"]} == {1.0} and len(joint["best_on_grid"]) == 5
    ms = [r["num_params"] for r in joint["frontier"]]
    assert ms == sorted(ms) and all(r["interval"][0] <= r["num_params"] <= r["interval"][1] for r in joint["frontier"])
    assert "## The joint law over data and model size" in report and "(joint.png)" in report
    assert "(frontier.png)" in report and fit["formula"] in report and "width 0.125 (%)" in report
    assert "joint law (test_top5_error, 4 widths): err(n, m) =" in printed
    # The one-axis law is the widest model's alone: three seeds a size, not widths × seeds.
    summary = pd.read_csv(out / "summary.csv")
    assert (summary["n_seeds"] == 3).all() and doc["width"] == 1.0 and doc["trained_model"]["num_params"] == 3_840_000
    widest = exp.trials[exp.trials["width"] == 1.0]
    assert summary.set_index("n_train").loc[20_000, "test_top5_error_mean"] == pytest.approx(
        widest.loc[widest["n_train"] == 20_000, "test_top5_error"].mean())
    assert doc["warnings"] == []


def test_without_the_envelope_on_request(tmp_path, monkeypatch):
    _, doc, report = _run(tmp_path, monkeypatch, width_experiment(tmp_path / "widths"), "--no-envelope", n_boot=20)
    assert doc["joint"]["fit"]["envelope"] is False and "off (--no-envelope)" in report


def test_a_one_width_grid_is_analysed_as_before(tmp_path, monkeypatch, capsys):
    exp = width_experiment(tmp_path / "one", widths=(0.5,))
    out, doc, report = _run(tmp_path, monkeypatch, exp, n_boot=20)
    assert {p.name for p in out.iterdir()} == set(plot_scaling.OUTPUTS)
    assert "joint" not in doc and "width" not in doc and "## The joint law" not in report
    assert "joint law" not in capsys.readouterr().out
    assert (pd.read_csv(out / "summary.csv")["n_seeds"] == 3).all()


@pytest.mark.parametrize("change, code, words", [
    (dict(widths=(0.25, 1.0)), "joint_few_widths", "2 widths (threshold: at least 3)"),
    (dict(seeds=(0, 1)), "joint_few_seeds", "from 2 seed(s) in some (n, width) cells (threshold: at least 3)"),
    (dict(fractions=(1.0, 0.5)), None, "no joint law"),
])
def test_weak_width_grids_earn_their_warnings(tmp_path, change, code, words):
    from analysis import evidence
    from analysis.widths import analyse_joint

    exp = width_experiment(tmp_path / "weak", **change)
    joint = analyse_joint(exp.trials, "test_top5_error", n_boot=0, eps0=EPS0)
    found = evidence.judge_joint(joint, exp.trials)
    if code is None:  # two sizes: no fit at all, said in one warning
        assert [w.code for w in found] == ["joint_no_fit"] and words in found[0].message
        assert "at least 3 distinct training-set sizes" in found[0].message
        return
    assert code in [w.code for w in found]
    assert words in next(w.message for w in found if w.code == code)


def test_a_held_out_miss_of_the_joint_law_is_a_warning(tmp_path):
    from analysis import evidence
    from analysis.widths import analyse_joint

    exp = width_experiment(tmp_path / "miss")
    widest = exp.trials["width"] == 1.0
    exp.trials.loc[widest, "test_top5_error"] -= 0.06  # better than any law through the narrower widths
    joint = analyse_joint(exp.trials, "test_top5_error", n_boot=0, eps0=EPS0)
    found = {w.code: w.message for w in evidence.judge_joint(joint, exp.trials)}
    assert "joint_holdout_miss_m" in found and "threshold 2 points" in found["joint_holdout_miss_m"]


def test_a_law_where_width_does_not_matter_sets_no_frontier(tmp_path):
    from analysis import evidence
    from analysis.widths import analyse_joint

    exp = width_experiment(tmp_path / "flat")
    # Every width's error is the widest model's at that n and seed: the width term must come out flat.
    widest = exp.trials[exp.trials["width"] == 1.0].set_index(["n_train", "seed"])["test_top5_error"]
    exp.trials["test_top5_error"] = [widest[(r.n_train, r.seed)] for r in exp.trials.itertuples()]
    joint = analyse_joint(exp.trials, "test_top5_error", n_boot=0, eps0=EPS0)
    assert joint["frontier"] == [] and "model-size term" in joint["frontier_reason"]
    assert "joint_no_frontier" in [w.code for w in evidence.judge_joint(joint, exp.trials)]
