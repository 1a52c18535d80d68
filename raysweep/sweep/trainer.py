"""One trial of a sweep: the function Tune runs (`run_trial`), which fits a Ray Train
`TorchTrainer` for one (fraction, width, seed) point and passes its epochs on to Tune.

The trainer is stock Ray Train: `TorchTrainer` with `TorchConfig`, Ray's controller,
synchronisation actor, placement-group cleaner and dataset manager. A trial passes Train no
datasets: its workers read their own rows of the prepared cache on the node that trains
(raysweep.trial.loop).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from ray.train import UserCallback

from raysweep.config import Config
from raysweep.errors import RaysweepError
from raysweep.sweep import ray_compat
from raysweep.trial.metrics import select_metric
from raysweep.trial.reporting import unpack

if TYPE_CHECKING:
    import ray.train
    from ray.train.torch import TorchTrainer

TORCH_TIMEOUT_S = 1800  # the process group's timeout (Ray's default): a slow checkpoint must not end a DDP trial


def checkpoint_config(keep: int = 1) -> "ray.train.CheckpointConfig":
    """Keep the `keep` latest checkpoints. Each one carries the best weights so far, so the
    latest alone serves both resume and the best-validation test."""
    from ray.train import CheckpointConfig

    return CheckpointConfig(num_to_keep=max(1, int(keep)))


# Where a Train-level retry is announced: the controller writes a line with this key alone; the
# trial function puts it on the next epoch row it reports to Tune, where the sweep's display
# reads it (Tune's results are the one way from a trial to the driver).
WORKER_FAILURE = "worker_failure"


class ForwardReports(UserCallback):
    """In Train's controller: append each epoch a report carries (rank 0's metrics, unpacked: see
    raysweep.trial.reporting) as a JSON line to a file the trial function reads. Ray starts the
    controller on the trial function's node, so a local file joins them, and the controller
    never waits on Tune.

    A worker that fails (its process died, or its node with it: a lost host) is retried by Train
    itself, in the same Tune trial, up to `max_failures` times, so Tune sees no failure and its
    callbacks say nothing. Each failure is passed on as a WORKER_FAILURE line, once per failure."""

    def __init__(self, path: str, max_failures: int = 0):
        self.path, self.max_failures, self.failures = path, max_failures, 0

    def _append(self, rows) -> None:
        lines = "".join(json.dumps(row, default=str) + "\n" for row in rows)
        with open(self.path, "a") as f:
            f.write(lines)

    def after_report(self, run_context, metrics, checkpoint) -> None:
        self._append(unpack(metrics[0]))

    def after_exception(self, run_context, worker_exceptions) -> None:
        self.failures += 1
        if self.failures > self.max_failures:  # Train gives up: Tune sees the error and says so
            return
        rank, err = min(worker_exceptions.items(), key=lambda kv: kv[0])
        what = (str(err).strip().splitlines() or [""])[0].strip()
        self._append([{WORKER_FAILURE: f"failure {self.failures} of {self.max_failures} allowed: worker "
                                       f"{rank} {type(err).__name__}: {what}"[:300]}])


def train_run_name(trial_id: str) -> str:
    """The name of a Tune trial's Train run (its directory under the sweep's Train storage): one
    per trial, so a retried or resumed trial finds its own checkpoints."""
    return f"trial_{trial_id}"


def _forward_to_tune(path: Path, fitting) -> None:
    """Report every line the controller appends to `path` to Tune, in order, until `fitting`
    (the thread running fit()) has ended and the file is read to its end."""
    import ray.tune

    pending, note = "", None
    with open(path) as f:
        while True:
            done = not fitting.is_alive()  # before the read: every report fit() wrote is in it
            chunk = f.read()
            pending += chunk
            *lines, pending = pending.split("\n")
            for line in lines:
                row = json.loads(line)
                if set(row) == {WORKER_FAILURE}:  # rides on the next epoch row (a replayed one, often)
                    note = row
                    continue
                if note:
                    row, note = {**row, **note}, None
                ray.tune.report(row)
            if not chunk:
                if done:
                    return
                time.sleep(0.1)


def build_trainer(cfg: Config, prepared, fraction: float, seed: int, *, use_gpu: bool,
                  run_config: "ray.train.RunConfig", gpus_per_worker: float = 1.0, num_workers: int = 1,
                  token: str = "",
                  trial_start: float | None = None, precision: str | None = None,
                  reserve_bytes: int | None = None, width: float | None = None,
                  run_dir: str | None = None) -> "TorchTrainer":
    """The TorchTrainer of one (fraction, width, seed) trial over a `PreparedData`, running
    `raysweep.trial.loop.train_loop_per_worker` on `num_workers` workers (DDP when several:
    Ray's torch backend sets up the process group and shares CUDA_VISIBLE_DEVICES)."""
    import uuid

    from ray.train import ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from raysweep.trial.loop import train_loop_per_worker

    from raysweep.data import stratified_subset
    from raysweep.trial.residency import DEFAULT_RESERVE_BYTES

    if use_gpu and not gpus_per_worker > 0:
        raise RaysweepError(f"use_gpu needs a positive GPU share per worker, got {gpus_per_worker}")
    if num_workers < 1:
        raise RaysweepError(f"a trial needs at least one worker, got num_workers={num_workers}")
    labels = prepared.labels("train")
    n_train = len(stratified_subset(labels, fraction, seed))
    if n_train < num_workers:
        raise RaysweepError(f"fraction {fraction:g} holds {n_train} training images: fewer than the "
                            f"{num_workers} workers of a trial")
    if run_dir is None and run_config.storage_path and "://" not in str(run_config.storage_path):
        run_dir = str(Path(run_config.storage_path) / run_config.name)  # where Train keeps this run
    model = asdict(cfg.model)
    if width is not None:
        model["width"] = float(width)
    config = {"train": asdict(cfg.train), "model": model, "run_dir": run_dir, "fraction": float(fraction),
              "seed": int(seed), "prepared": prepared, "num_classes": int(prepared.num_classes),
              "n_train": n_train, "n_full": len(labels), "n_val": len(prepared.labels("validation")),
              "n_test": len(prepared.labels("test")), "image_size": int(prepared.image_size),
              "select_metric": select_metric(cfg.train.select_metric, prepared.num_classes),
              "checkpoint_every": cfg.sweep.checkpoint_every, "token": token or uuid.uuid4().hex,
              "trial_start": trial_start or time.time(), "precision": precision,
              "gpu_share": gpus_per_worker if use_gpu else 0.0,
              "reserve_bytes": int(reserve_bytes or DEFAULT_RESERVE_BYTES),
              "checkpoint_root": run_dir if run_dir and ray_compat.in_place_checkpoints(run_dir) else None}
    resources = {"CPU": cfg.sweep.cpus_per_trial, **({"GPU": gpus_per_worker} if use_gpu else {})}
    return TorchTrainer(
        train_loop_per_worker, train_loop_config=config, torch_config=TorchConfig(timeout_s=TORCH_TIMEOUT_S),
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=run_config)


def worker_env_vars(threads: int, use_gpu: bool) -> dict[str, str]:
    """Environment variables a trial's Train workers start with: OMP_NUM_THREADS for a CPU
    trial's thread count (OpenMP sizes its pool when the process starts; measured ~12% faster
    epochs than Ray's 1), and ray_compat's worker defaults."""
    env = ray_compat.worker_env(use_gpu)
    if threads > 1:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def _worker_threads(cfg: Config, plan) -> int:
    """Threads a CPU trial's workers use (GPU trials: 1)."""
    if plan is None or plan.use_gpu:
        return 1
    return int(cfg.train.num_threads or plan.torch_threads or 1)


def run_trial(params: dict, *, cfg_dict: dict, prepared, plan, train_storage: str, gpu_setup: dict) -> None:
    """One Tune trial: build this point's trainer, fit it, and pass its reports to Tune.

    The Train run is named after the trial id, so a retried or resumed trial finds its own
    checkpoints under the same (storage_path, name) and continues from them. Reports travel
    from Train's controller through a file it appends to (`ForwardReports`) and are reported to
    Tune from this function's own thread, in order; it returns only once every one is in, so
    Tune's end-of-trial marker always comes after the last epoch. (Ray's TuneReportCallback
    hands them over through a one-slot queue that races that marker: the last epoch of a
    trial went missing when two trials ran at once.)
    """
    trial_start = time.time()
    import os
    import tempfile
    import threading
    import uuid

    import ray.data
    import ray.train
    import ray.tune

    cfg = Config.from_dict(cfg_dict)
    # One progress display for the sweep (the driver's): per-trial Ray Data bars would flood it.
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    trial_id = ray.tune.get_context().get_trial_id()
    handle, reports = tempfile.mkstemp(prefix="raysweep-reports-", suffix=".jsonl")
    os.close(handle)
    name = train_run_name(trial_id)
    run_config = ray.train.RunConfig(
        name=name,
        storage_path=train_storage,
        worker_runtime_env={"env_vars": worker_env_vars(_worker_threads(cfg, plan), plan.use_gpu)},
        callbacks=[ForwardReports(reports, max_failures=cfg.sweep.max_failures)],
        checkpoint_config=checkpoint_config(cfg.sweep.keep_checkpoints),
        failure_config=ray.train.FailureConfig(max_failures=cfg.sweep.max_failures),
    )
    fraction = float(params["fraction"])
    trainer = build_trainer(cfg, prepared, fraction, int(params["seed"]), use_gpu=plan.use_gpu,
                            gpus_per_worker=plan.gpu_share(fraction) if plan.use_gpu else 0.0,
                            num_workers=plan.num_workers, run_config=run_config,
                            token=uuid.uuid4().hex, trial_start=trial_start,
                            width=params.get("width"), run_dir=str(Path(train_storage) / name), **gpu_setup)
    # Read by the worker: the seconds this function spent on imports and building the trainer,
    # and those from fit() to the worker's first line (controller, worker group, process group).
    trainer.train_loop_config["fit_start"] = time.time()
    failure: list[BaseException] = []

    def fit() -> None:
        try:
            trainer.fit()
        except BaseException as err:  # re-raised in this trial's thread, where Tune sees it
            failure.append(err)

    fitting = threading.Thread(target=fit, name="raysweep-fit", daemon=True)
    fitting.start()
    try:
        _forward_to_tune(Path(reports), fitting)
    finally:
        Path(reports).unlink(missing_ok=True)
    if failure:
        raise failure[0]
