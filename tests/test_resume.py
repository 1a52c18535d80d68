"""--resume runs the stored sweep or refuses: options that contradict raysweep_config.json are
named in one line before Ray starts, and say how to start a new experiment."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from raysweep.config import DEFAULT_CONFIG, load_config
from raysweep.errors import RaysweepError
from raysweep.sweep.resume import check_resume

REPO = Path(__file__).resolve().parent.parent
DEMO = DEFAULT_CONFIG.parent / "demo.yaml"


@pytest.fixture
def stored(tmp_path) -> tuple[Path, dict]:
    """An experiment dir as a first start of configs/demo.yaml leaves it (torch threads settled)."""
    cfg = load_config(DEMO)
    cfg.train.num_threads = 1
    exp = tmp_path / "results" / "X"
    exp.mkdir(parents=True)
    (exp / "raysweep_config.json").write_text(json.dumps(cfg.to_dict()))
    return exp, cfg.to_dict()


def test_fewer_epochs_on_resume_is_refused_in_one_line_before_ray_starts(stored):
    exp, _ = stored
    start = time.monotonic()
    run = subprocess.run([sys.executable, "-m", "raysweep.tune", "--resume", "--name", "X", "--storage-path",
                          str(exp.parent), "--epochs", "5", "--set", "train.lr=0.1"], cwd=REPO,
                         capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    took = time.monotonic() - start
    assert run.returncode == 2 and run.stdout == "", run.stdout + run.stderr
    (line,) = run.stderr.strip().splitlines()
    assert line == ("raysweep: error: --resume: train.epochs 5 (--epochs 5; stored: 150), train.lr 0.1 "
                    "(--set train.lr=0.1; stored: 0.002) contradict the stored config of X (raysweep_config.json); a resumed "
                    "sweep runs the config it was started with (Tune cannot add or change the trials of a stored "
                    "sweep). To run with them, start a new experiment: drop --resume and pass --name NEW")
    assert took < 15, f"refused after {took:.1f} s: Ray must not have started"
    assert sorted(p.name for p in exp.iterdir()) == ["raysweep_config.json"], "nothing written"


@pytest.mark.parametrize("config, asked, named", [
    (None, [("sweep.seeds=[0, 1, 2, 3]", "--seeds 0 1 2 3")], "sweep.seeds [0, 1, 2, 3] (--seeds 0 1 2 3; stored: [0, 1])"),
    (None, [("data.source=synthetic", "--data synthetic")], "data.source 'synthetic' (--data synthetic"),
    (str(DEFAULT_CONFIG), [], f"--config {DEFAULT_CONFIG}; stored:"),
])
def test_each_contradiction_is_named(stored, config, asked, named):
    exp, cfg = stored
    with pytest.raises(RaysweepError) as err:
        check_resume(exp, cfg, config, asked)
    assert named in str(err.value) and "--name NEW" in str(err.value) and "\n" not in str(err.value)


def test_options_that_agree_with_the_stored_config_pass(stored):
    exp, cfg = stored
    check_resume(exp, cfg, None, [])
    check_resume(exp, cfg, None, [("train.epochs=150", "--epochs 150"), ("sweep.seeds=[0, 1]", "--seeds 0 1")])
    # The same config file: its train.num_threads 0 (auto) is what the first start settled to 1.
    check_resume(exp, cfg, str(DEMO), [])


def test_an_invalid_combination_on_resume_says_so_and_how_to_start_anew(stored):
    exp, cfg = stored
    with pytest.raises(RaysweepError, match=r"--resume: the options asked for do not make a valid config "
                                            r"\(config key 'model.width' = 0.0625 applies to alexnet only.*--name NEW"):
        check_resume(exp, cfg, None, [("model.name=resnet18", "--set model.name=resnet18")])


def test_a_resumed_trial_says_from_which_epoch(tmp_path):
    """The display reads the trial's newest complete checkpoint; a trial without one starts."""
    import io
    from types import SimpleNamespace

    from raysweep.sweep.display import SweepDisplay

    runs = tmp_path / "train_runs"
    for epoch, complete in ((4, True), (6, True), (8, False)):  # epoch 8 was being written at the stop
        d = runs / "trial_a" / f"checkpoint_epoch_{epoch:04d}"
        d.mkdir(parents=True)
        if complete:
            (d / "history.json").write_text(json.dumps([{"epoch": e} for e in range(1, epoch + 1)]))
    out = io.StringIO()
    plan = {(1.0, 1.0, 0): {"n_train": 200, "max_epochs": 150}, (0.5, 1.0, 0): {"n_train": 100, "max_epochs": 150}}
    display = SweepDisplay(plan, "val_top1_error", stream=out, train_runs=runs)
    display.on_trial_start(0, [], SimpleNamespace(trial_id="a", config={"fraction": 1.0, "seed": 0}))
    display.on_trial_start(0, [], SimpleNamespace(trial_id="b", config={"fraction": 0.5, "seed": 0}))
    resumed, fresh = [ln for ln in out.getvalue().splitlines() if ln.startswith("[")]
    assert resumed == "[1/2] resume (from epoch 6) fraction 1       seed 0   n_train     200  (up to 150 epochs)"
    assert fresh == "[2/2] start  fraction 0.5     seed 0   n_train     100  (up to 150 epochs)"


def test_a_finished_trial_that_tune_starts_again_is_a_replay_and_keeps_the_count(tmp_path):
    """An interrupt between a trial's last report and Tune marking it done: summary.json has it
    finished, Tune starts it again, and it only re-reports from its final checkpoint. The display
    says so, gives it no new number, and its epochs do not move the bar."""
    import io
    from types import SimpleNamespace

    from raysweep.sweep.display import SweepDisplay

    runs = tmp_path / "train_runs"
    d = runs / "trial_a" / "checkpoint_epoch_0002"
    d.mkdir(parents=True)
    (d / "history.json").write_text(json.dumps([{"epoch": 1}, {"epoch": 2}]))
    out = io.StringIO()
    plan = {(f, 1.0, 0): {"n_train": n, "max_epochs": 2} for f, n in ((1.0, 200), (0.5, 100), (0.25, 50))}
    display = SweepDisplay(plan, "val_top1_error", stream=out, train_runs=runs, done={(1.0, 1.0, 0)})
    total = display.bar.total
    replay = SimpleNamespace(trial_id="a", config={"fraction": 1.0, "seed": 0}, last_result={})
    display.on_trial_start(0, [], replay)
    display.on_trial_result(0, [], replay, {"epoch": 1})
    display.on_trial_complete(0, [], replay)
    display.on_trial_start(0, [], SimpleNamespace(trial_id="b", config={"fraction": 0.5, "seed": 0}))
    display.on_trial_start(0, [], SimpleNamespace(trial_id="c", config={"fraction": 0.25, "seed": 0}))
    lines = [ln for ln in out.getvalue().splitlines() if ln.startswith("[")]
    assert lines[0].startswith("[-/3] replay fraction 1 ") and "its 2 epochs are re-reported" in lines[0]
    assert [ln[:11] for ln in lines[1:]] == ["[2/3] start", "[3/3] start"]
    assert display.bar.total == total == 4 and display.bar.done == 0
