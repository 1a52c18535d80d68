"""The sweep CLI end to end: user errors, the smoke sweep read back through Tune, kill + resume."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, run_cli
from raysweep.console import python_command

PER_EPOCH = ["epoch", "lr", "train_loss", "train_top1_error", "train_top5_error", "val_loss",
             "val_top1_error", "val_top5_error", "images_per_sec", "n_train", "steps", "time_train_s",
             "time_eval_s", "time_checkpoint_s", "time_epoch_s", "wall_time_s", "time_to_first_step_s"]
# Ray's log lines that must not reach a user's console at the default verbosity.
RAY_NOISE = ["INFO", "TrainingReport", "PreemptionWatcher", "worker group", "== Status ==", "Tuner.restore",
             "\x1b["]
FINAL = ["test_loss", "test_top1_error", "test_top5_error", "best_epoch", "best_val_top5_error", "learned"]


@pytest.mark.parametrize("args,expect", [
    (["--num-gpus", "1"], "--num-gpus 1 asked for, but this machine has 0 GPU(s)"),
    (["--gpus-per-trial", "1"], "--gpus-per-trial 1"),
    (["--set", "data.image_size=32"], "AlexNet needs at least 63 px"),
    (["--set", "model.name=no_such_net", "--set", "model.width=1"], "'no_such_net' is not a torchvision classification model"),
    (["--set", "train.nonsense=3"], "unknown config key 'train.nonsense'"),
    (["--data", "./no/such/snapshot"], "data source './no/such/snapshot': no such file or directory"),
    (["--fractions", "0.5", "1.5"], "'sweep.fractions[1]' = 1.5 is outside (0, 1]"),
    (["--address", "127.0.0.1:1", "--no-dashboard"], "--no-dashboard applies to the Ray this sweep starts"),
])
def test_user_errors_are_one_line_and_start_nothing(tmp_path, args, expect):
    proc = run_cli("raysweep.tune", "--config", "configs/smoke.yaml", "--storage-path", str(tmp_path),
                   "--quiet", *args, check=False, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert expect in lines[0] and lines[0].startswith("raysweep: error:")
    assert "Traceback" not in proc.stderr
    assert list(tmp_path.iterdir()) == []  # no experiment, no cache: nothing started
    assert "Ray" not in proc.stdout  # refused before Ray started: no dashboard line


def test_smoke_sweep_reads_back_through_tune(smoke_experiment, ray_session):
    from ray import tune

    from raysweep.sweep.trainer import run_trial

    analysis = tune.ExperimentAnalysis(str(smoke_experiment))
    grid = {(t.config["fraction"], t.config["seed"]) for t in analysis.trials}
    assert grid == {(1.0, 0), (1.0, 1), (0.5, 0), (0.5, 1)}
    assert len(analysis.trials) == 4  # one trial per grid point
    frames = analysis.trial_dataframes
    for trial in analysis.trials:
        df = frames[trial.trial_id]
        assert list(df["epoch"]) == [1, 2]
        for key in PER_EPOCH:
            assert df[key].notna().all(), key
        assert df["val_top5_error"].between(0, 1).all()
        last = trial.last_result
        for key in FINAL:
            assert key in last, key
        assert 0.0 <= last["test_top5_error"] <= last["test_top1_error"] <= 1.0
        assert 1 <= last["best_epoch"] <= 2
    # The same experiment through Tuner.restore(...).get_results().
    results = tune.Tuner.restore(str(smoke_experiment), trainable=run_trial).get_results()
    assert len(results) == 4 and not results.errors
    n_train = {r.config["fraction"]: r.metrics["n_train"] for r in results}
    assert n_train[1.0] == 48 and n_train[0.5] == 24  # 4 classes x 12, stratified half


def test_the_default_console_is_the_sweeps_display_not_rays_logs(smoke_experiment):
    out = (smoke_experiment.parent / "cli_stdout.txt").read_text()
    err = (smoke_experiment.parent / "cli_stderr.txt").read_text()
    for noise in RAY_NOISE:
        assert noise not in out + err, noise
    lines = out.splitlines()
    starts = [ln for ln in lines if "] start " in ln]
    ends = [ln for ln in lines if "] done " in ln]
    assert len(starts) == len(ends) == 4  # one line each as a trial starts and ends
    for ln in ends:
        assert "fraction" in ln and "seed" in ln and "n_train" in ln and "epochs" in ln and "val top1 error" in ln
    # The piped (non-terminal) bar prints plain progress lines, and the sweep ends with its table.
    assert any(ln.startswith("sweep: ") and "epochs" in ln and "ETA" in ln for ln in lines)
    table = lines.index(next(ln for ln in lines if ln.split()[:2] == ["fraction", "seed"]))
    assert table > lines.index(ends[-1]) and lines[-1].startswith("Next: ")
    assert lines[-1] == f"Next: {python_command('-m', 'analysis.plot_scaling', smoke_experiment)}"


def test_summary_files(smoke_experiment):
    import pandas as pd

    summary = pd.read_csv(smoke_experiment / "summary.csv")
    rows = json.loads((smoke_experiment / "summary.json").read_text())
    assert len(summary) == len(rows) == 4
    assert set(summary["status"]) == {"TERMINATED"}
    for col in ["fraction", "seed", "n_train", "best_epoch", "learned", "val_top5_error",
                "test_top5_error", "test_loss", "wall_time_s"]:
        assert summary[col].notna().all(), col
    assert (summary["wall_time_s"] > 0).all()
    assert not list(smoke_experiment.glob(".summary*.tmp"))


def _finished_trials(exp: Path) -> dict[str, str]:
    """Trial dir -> its result.json text, for trials whose final report has reached storage."""
    done = {}
    for result in exp.glob("*/result.json"):
        text = result.read_text()
        if any("test_top5_error" in json.loads(ln) for ln in text.splitlines() if ln.strip()):
            done[result.parent.name] = text
    return done


def _metrics(result_json: str) -> list[dict]:
    """The trial's own metrics, row by row, without Tune's bookkeeping (timestamps, pid, iteration)."""
    rows = [json.loads(ln) for ln in result_json.splitlines() if ln.strip()]
    return [{k: row.get(k) for k in PER_EPOCH + FINAL} for row in rows]


def _sweep(ray_cluster, tmp_path, name, *extra) -> list[str]:
    return [sys.executable, "-m", "raysweep.tune", "--config", "configs/smoke.yaml", "--address", ray_cluster,
            "--storage-path", str(tmp_path), "--name", name, "--set", f"data.cache_dir={tmp_path / 'cache'}",
            *extra]


def _interrupted(cmd: list[str], until, what: str, stop) -> tuple[int, str, str]:
    """Run `cmd` in its own process group until `until()` holds, `stop(proc)` it, and return its
    exit code, stdout and stderr (the group is killed if it outlives that)."""
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _wait_for(until, proc, what)
        stop(proc)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode, out, err


def _wait_for(predicate, proc, what: str, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while not predicate() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    assert proc.poll() is None, f"the sweep ended before {what}"
    assert predicate(), f"timed out waiting for {what}"


@pytest.mark.slow
def test_killed_driver_resumes_without_retraining_finished_trials(ray_cluster, tmp_path):
    exp = tmp_path / "killed"
    # Three trials one at a time: the driver's snapshots reach storage every 2 s, and a trial
    # takes longer, so the kill lands with some trials finished in storage and some not.
    proc = subprocess.Popen(_sweep(ray_cluster, tmp_path, "killed", "--quiet", "--fractions", "1", "0.5", "0.25",
                                   "--seeds", "0", "--set", "sweep.max_concurrent_trials=1"),
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        _wait_for(lambda: _finished_trials(exp), proc, "a trial finished")
        finished = _finished_trials(exp)
        assert 1 <= len(finished) < 3, list(finished)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    time.sleep(3)  # let the cluster notice the dead driver and free its trial's resources

    run_cli("raysweep.tune", "--address", ray_cluster, "--storage-path", str(tmp_path),
            "--name", "killed", "--resume", "--quiet")
    after = _finished_trials(exp)
    assert len(after) == 3  # every grid point ends with one complete trial
    for trial_dir, text in finished.items():
        # A finished trial was not trained again: the same epochs with the same losses and the same
        # measured seconds. (If the kill came between its last result and Tune marking it done, the
        # resume reports it again from its final checkpoint, with new Tune timestamps.)
        assert _metrics(after[trial_dir]) == _metrics(text)
    from ray import tune

    analysis = tune.ExperimentAnalysis(str(exp))
    assert sorted(t.config["fraction"] for t in analysis.trials) == [0.25, 0.5, 1.0]
    for trial in analysis.trials:
        epochs = [json.loads(ln)["epoch"] for ln in (Path(trial.path) / "result.json").read_text().splitlines()
                  if ln.strip()]
        assert epochs == [1, 2]  # each epoch reported once, none lost or repeated


@pytest.mark.slow
def test_ctrl_c_in_a_fraction_width_seed_sweep_then_resume_reruns_nothing_and_loses_nothing(ray_cluster, tmp_path):
    """The grid over fraction x width x seed, interrupted with Ctrl-C once a trial has finished:
    the resume trains only what was left, and every grid point ends with its epochs once."""
    exp = tmp_path / "grid"
    grid = ["--fractions", "1", "0.5", "--widths", "0.125", "0.25", "--seeds", "0"]
    rc, out, err = _interrupted(_sweep(ray_cluster, tmp_path, "grid", *grid, "--set", "sweep.max_concurrent_trials=1"),
                                lambda: _finished_trials(exp), "a trial finished",
                                lambda proc: os.killpg(proc.pid, signal.SIGINT))
    assert rc == 1, out + err
    assert "--resume --name grid" in out and "Traceback" not in err
    finished = _finished_trials(exp)
    assert 1 <= len(finished) < 4, list(finished)

    resumed = run_cli("raysweep.tune", "--address", ray_cluster, "--storage-path", str(tmp_path),
                      "--name", "grid", "--resume")
    after = _finished_trials(exp)
    assert len(after) == 4
    for trial_dir, text in finished.items():
        assert _metrics(after[trial_dir]) == _metrics(text)  # not trained again
    # The resumed driver trains only the trials that had not finished. A finished trial that
    # Tune starts again (the Ctrl-C landed between its last report and Tune marking it done)
    # only replays its epochs from its final checkpoint, and says so.
    lines = resumed.stdout.splitlines()
    trained = [ln for ln in lines if "] start " in ln or "] resume " in ln]
    replays = [ln for ln in lines if "] replay " in ln]
    assert len(trained) == 4 - len(finished), resumed.stdout
    assert all("its 2 epochs are re-reported" in ln and "nothing trains" in ln for ln in replays), replays
    assert max(int(k) for k in re.findall(r"\[\s*(\d+)/4\]", resumed.stdout)) <= 4, resumed.stdout
    for text in after.values():
        assert [json.loads(ln)["epoch"] for ln in text.splitlines() if ln.strip()] == [1, 2]
    rows = json.loads((exp / "summary.json").read_text())
    assert sorted((r["fraction"], r["width"], r["seed"]) for r in rows) == [
        (0.5, 0.125, 0), (0.5, 0.25, 0), (1.0, 0.125, 0), (1.0, 0.25, 0)]
    assert {r["status"] for r in rows} == {"TERMINATED"}
    params = {r["width"]: r["num_params"] for r in rows}
    assert params[0.125] < params[0.25]  # each width's trials carry its own parameter count
    assert {r["n_train"] for r in rows if r["fraction"] == 0.5} == {24}  # the same subset at every width


def _tensorboard_steps(trial_dir: Path, tag: str) -> list[int]:
    """Steps of one scalar over every TensorBoard events file of a trial, read record by record."""
    import struct

    from tensorboardX.proto import event_pb2

    steps = []
    for path in sorted(trial_dir.glob("events.out.tfevents.*")):
        data, i = path.read_bytes(), 0
        while i < len(data):  # TFRecord framing: length, its CRC, the event, its CRC
            (n,) = struct.unpack("<Q", data[i:i + 8])
            event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
            i += 12 + n + 4
            steps += [event.step for v in event.summary.value if v.tag == tag]
    return steps


@pytest.mark.slow
@pytest.mark.parametrize("stop", ["ctrl-c", "sigterm"])
def test_ctrl_c_right_after_a_checkpoint_then_resume_keeps_every_epoch_once(ray_cluster, tmp_path, stop):
    """Ctrl-C reaches the whole foreground group; SIGTERM (`kill`, `docker stop`) the driver
    alone, which stops the sweep the same way instead of Ray's handler aborting it."""
    exp = tmp_path / "intr"
    epochs = 12
    rc, out, err = _interrupted(
        _sweep(ray_cluster, tmp_path, "intr", "--fractions", "1", "--seeds", "0", "--epochs", str(epochs),
               "--set", "sweep.checkpoint_every=2"),
        lambda: list(exp.glob("train_runs/*/checkpoint_epoch_0002/history.json")), "the epoch-2 checkpoint",
        (lambda proc: os.killpg(proc.pid, signal.SIGINT)) if stop == "ctrl-c" else
        (lambda proc: os.kill(proc.pid, signal.SIGTERM)))
    assert rc == 1, out + err
    # After an interrupt: only the tool's own resume line, not Ray's Tuner.restore hint, no "Next:".
    assert f"--resume --name intr --storage-path {tmp_path}" in out
    assert "Tuner.restore" not in out + err and "Next:" not in out and "Traceback" not in err
    assert "SIGTERM received" not in err  # Ray's C++ handler's stack dump

    # The printed line, pasted into a shell where no venv is active (only the system's PATH).
    (line,) = [ln.strip() for ln in out.splitlines() if "--resume --name intr" in ln]
    assert line == python_command("-m", "raysweep.tune", "--resume", "--name", "intr", "--storage-path",
                                  tmp_path, "--address", ray_cluster)
    resumed = subprocess.run(["/bin/sh", "-c", line + " --verbose"], cwd=REPO, capture_output=True, text=True,
                             timeout=900, env={**os.environ, "PATH": "/usr/bin:/bin", "PYTHONUNBUFFERED": "1"})
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "Started training worker group" in resumed.stdout + resumed.stderr  # --verbose: Ray's logs are back
    # The trial continues from its checkpoint (epoch 2 or a later one) and says so.
    assert re.search(r"\] resume \(from epoch \d+\) fraction 1 ", resumed.stdout), resumed.stdout
    (trial_dir,) = [p for p in exp.iterdir() if p.name.startswith("run_trial_")]
    rows = [json.loads(ln) for ln in (trial_dir / "result.json").read_text().splitlines() if ln.strip()]
    assert [r["epoch"] for r in rows] == list(range(1, epochs + 1))
    import pandas as pd

    assert list(pd.read_csv(trial_dir / "progress.csv")["epoch"]) == list(range(1, epochs + 1))
    assert _tensorboard_steps(trial_dir, "ray/tune/val_loss") == list(range(1, epochs + 1))
    walls = [r["wall_time_s"] for r in rows]
    assert walls == sorted(walls)  # the resumed attempt adds to the first one's time
    assert "test_top5_error" in rows[-1]


def test_a_stopped_sweep_lists_grid_points_never_started():
    from raysweep.sweep.summary import complete_grid

    done = [{"fraction": 1.0, "width": 0.5, "seed": 0, "status": "TERMINATED"},
            {"fraction": 0.5, "width": 0.5, "seed": 0, "status": "UNFINISHED"}]
    rows = complete_grid(done, [1.0, 0.5], [0, 1])
    assert [(r["fraction"], r["seed"], r["status"]) for r in rows] == [
        (1.0, 0, "TERMINATED"), (1.0, 1, "NOT_STARTED"), (0.5, 0, "UNFINISHED"), (0.5, 1, "NOT_STARTED")]
    # A width grid: every (fraction, width, seed) point, ordered by fraction, width, seed.
    rows = complete_grid(done, [1.0, 0.5], [0], widths=[0.25, 0.5])
    assert [(r["fraction"], r["width"], r["status"]) for r in rows] == [
        (1.0, 0.25, "NOT_STARTED"), (1.0, 0.5, "TERMINATED"), (0.5, 0.25, "NOT_STARTED"), (0.5, 0.5, "UNFINISHED")]


@pytest.mark.slow
def test_a_two_worker_cpu_trial_trains_through_a_sweep(ray_cluster, tmp_path):
    """sweep.cpu_workers_per_trial=2: one trial on two Train workers (DDP over gloo, one on each
    node of the session cluster), through the CLI, to its test error."""
    import json

    proc = run_cli("raysweep.tune", "--config", "configs/smoke.yaml", "--address", ray_cluster,
                   "--storage-path", str(tmp_path), "--name", "ddp", "--fractions", "1", "--seeds", "0",
                   "--set", f"data.cache_dir={tmp_path / 'cache'}", "--set", "sweep.cpu_workers_per_trial=2")
    assert "2 CPU workers" in proc.stdout
    rows = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert [r["status"] for r in rows] == ["TERMINATED"]
    epochs = [json.loads(line) for line in
              next((tmp_path / "ddp").glob("*/result.json")).read_text().splitlines()]
    assert [e["epoch"] for e in epochs] == [1, 2]
    assert all(e["world_size"] == 2 for e in epochs)
    # Each rank trains on its half of the subset: 48 images, 24 a rank, 2 steps of 16 an epoch
    # on each (the last batch of 8 too): the trial's step count is one rank's.
    assert epochs[-1]["steps"] == 2 * 2 and 0 <= epochs[-1]["test_top1_error"] <= 1
