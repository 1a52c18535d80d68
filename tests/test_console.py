"""The console: the plain progress line and the sweep display's ETA, on a fake clock."""

from __future__ import annotations

import io
from types import SimpleNamespace

import pytest

from raysweep import console
from raysweep.sweep import display as sweep_display
from raysweep.console import Progress, format_duration
from raysweep.sweep.display import SweepDisplay


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(console.time, "monotonic", c)
    monkeypatch.setattr(sweep_display.time, "monotonic", c)
    return c


def trial(fraction: float, seed: int, **last):
    return SimpleNamespace(trial_id=f"t{fraction}_{seed}", config={"fraction": fraction, "seed": seed},
                           last_result=last)


def test_format_duration_reads_as_h_mm_ss():
    assert format_duration(5) == "0:05"
    assert format_duration(3725) == "1:02:05"
    assert format_duration(None) == "?"


def test_plain_progress_line_has_rate_elapsed_and_eta(clock):
    out = io.StringIO()
    bar = Progress(100, "load", "img", stream=out, every_s=0.0, force_plain=True)
    clock.now += 10
    bar.update(25)  # 2.5 img/s, 75 left -> 30 s
    line = out.getvalue().strip().splitlines()[-1]
    assert line == "load: 25/100 img (25%), 2.5 img/s, elapsed 0:10, ETA 0:30"


def test_sweep_eta_comes_from_finished_trials_of_the_same_fraction(clock):
    plan = {(1.0, 1.0, 0): {"max_epochs": 50, "n_train": 1000}, (1.0, 1.0, 1): {"max_epochs": 50, "n_train": 1000},
            (0.5, 1.0, 0): {"max_epochs": 50, "n_train": 500}, (0.5, 1.0, 1): {"max_epochs": 50, "n_train": 500}}
    out = io.StringIO()
    d = SweepDisplay(plan, "val_top1_error", stream=out, concurrency=1)
    assert "ETA after the first trial ends" in d.bar._postfix

    big0 = trial(1.0, 0, epoch=20, max_epochs=50, stopped_early=True, val_top1_error=0.4, test_top1_error=0.41)
    d.on_trial_start(0, [], big0)
    clock.now += 100
    d.on_trial_complete(0, [], big0)
    # Nothing of fraction 0.5 has finished: every trial left is expected to take 100 s.
    assert d.bar._postfix == "trials 1/4 done, ETA 5:00"

    small0 = trial(0.5, 0, epoch=15, max_epochs=50, stopped_early=True, val_top1_error=0.5, test_top1_error=0.5)
    d.on_trial_start(0, [], small0)
    clock.now += 40
    d.on_trial_complete(0, [], small0)
    # left: one 1.0 trial (100 s) + one 0.5 trial (40 s)
    assert d.bar._postfix == "trials 2/4 done, ETA 2:20"

    big1 = trial(1.0, 1)
    d.on_trial_start(0, [], big1)
    clock.now += 30
    d.on_trial_result(0, [], big1, {"epoch": 1})
    # the running one has 70 s to go, the last 40 s
    assert d.bar._postfix == "trials 2/4 done, ETA 1:50"
    lines = out.getvalue().splitlines()
    assert any("start" in ln and "fraction 1" in ln for ln in lines)
    assert any("stopped early" in ln for ln in lines)


def test_sweep_eta_divides_by_concurrency_and_counts_each_epoch_once(clock):
    plan = {(1.0, 1.0, s): {"max_epochs": 10, "n_train": 100} for s in range(4)}
    d = SweepDisplay(plan, "val_top1_error", stream=io.StringIO(), concurrency=2)
    first = trial(1.0, 0, epoch=10, max_epochs=10)
    d.on_trial_start(0, [], first)
    for epoch in (1, 2, 2, 3):  # a restarted trial replays epoch 2
        d.on_trial_result(0, [], first, {"epoch": epoch})
    assert d.bar.done == 3
    clock.now += 60
    d.on_trial_complete(0, [], first)
    assert d.bar._postfix == "trials 1/4 done, ETA 1:30"  # 3 trials x 60 s over 2 slots


def test_a_retried_and_a_failed_trial_each_get_one_line_naming_their_error_file(clock):
    plan = {(1.0, 1.0, 0): {"max_epochs": 10, "n_train": 100}, (0.5, 1.0, 0): {"max_epochs": 10, "n_train": 50}}
    out = io.StringIO()
    d = SweepDisplay(plan, "val_top1_error", stream=out, concurrency=1)
    t = trial(1.0, 0)
    t.path, t.num_failures, t.max_failures = "/r/trial_a", 1, 2
    d.on_trial_start(0, [], t)
    d.on_trial_recover(0, [], t)
    u = trial(0.5, 0)
    u.path = "/r/trial_b"
    d.on_trial_start(0, [], u)
    d.on_trial_error(0, [], u)
    lines = [ln for ln in out.getvalue().splitlines() if "retry" in ln or "FAILED" in ln]
    assert lines == ["[1/2] retry  fraction 1       seed 0   n_train     100: failure 1 of 2 allowed, resuming "
                     "from its last checkpoint; see /r/trial_a/error.txt",
                     "[2/2] FAILED fraction 0.5     seed 0   n_train      50: see /r/trial_b/error.txt"]
    assert d.bar._postfix.startswith("trials 1/2 done")  # the retried trial is not done


def test_a_worker_failure_ray_train_retries_gets_one_retry_line(clock):
    # Train restarts a lost worker inside the same Tune trial: Tune's callbacks hear nothing, the
    # row after it carries the note (raysweep.sweep.trainer.ForwardReports).
    plan = {(1.0, 1.0, 0): {"max_epochs": 4, "n_train": 100}}
    out = io.StringIO()
    d = SweepDisplay(plan, "val_top1_error", stream=out, concurrency=1)
    t = trial(1.0, 0)
    d.on_trial_start(0, [], t)
    for epoch in (1, 2, 3):
        d.on_trial_result(0, [], t, {"epoch": epoch})
    note = "failure 1 of 2 allowed: worker 0 ActorDiedError: The actor died unexpectedly"
    d.on_trial_result(0, [], t, {"epoch": 1, "worker_failure": note})  # the replay's first row
    d.on_trial_result(0, [], t, {"epoch": 2})
    lines = [ln for ln in out.getvalue().splitlines() if "retry" in ln]
    assert lines == [f"[1/1] retry  fraction 1       seed 0   n_train     100: {note}; "
                     "Ray Train resumes it from its last checkpoint"]
    assert d.bar.done == 3  # the replayed epochs are not counted again


def test_a_width_grid_names_width_and_parameters_in_each_line(clock):
    plan = {(1.0, w, 0): {"max_epochs": 5, "n_train": 100, "num_params": p}
            for w, p in ((0.25, 1_250_000), (0.5, 4_100_000))}
    out = io.StringIO()
    d = SweepDisplay(plan, "val_top1_error", stream=out, concurrency=1)
    t = trial(1.0, 0, epoch=5, max_epochs=5, val_top1_error=0.4, test_top1_error=0.41)
    t.config["width"] = 0.5
    d.on_trial_start(0, [], t)
    clock.now += 10
    d.on_trial_complete(0, [], t)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("[1/2] start  fraction 1       width 0.5   (4.10 M params) seed 0   n_train     100")
    assert (1.0, 0.5, 0) in d.finished and d.bar._postfix == "trials 1/2 done, ETA 0:10"
