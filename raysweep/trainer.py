"""One trial of a sweep: the function Tune runs (`run_trial`), the Ray Train trainer it fits
(`build_trainer()`) and what that needs, all without importing torch.

A trial function (in a Tune actor) builds the trainer, and Train's controller (run in that same
actor: `SweepTrainer`) unpickles its backend; neither trains, so neither should pay torch's
import, seconds on a small machine and on every trial. The workers import torch with the loop
(`raysweep.train`).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from ray.train import UserCallback
from ray.train.backend import Backend, BackendConfig
from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

from raysweep.config import Config
from raysweep.errors import RaysweepError
from raysweep.metrics import select_metric
from raysweep.reporting import unpack

if TYPE_CHECKING:
    import ray.train


def checkpoint_config(keep: int = 1) -> "ray.train.CheckpointConfig":
    """Keep the `keep` latest checkpoints. Each one carries the best weights so far, so the
    latest alone serves both resume and the best-validation test."""
    from ray.train import CheckpointConfig

    return CheckpointConfig(num_to_keep=max(1, int(keep)))


class _DeviceContext:
    """Around the worker's loop: Ray's torch context (the default CUDA device), imported there."""

    def __enter__(self):
        from ray.train.torch.config import TorchConfigContextManager

        self._inner = TorchConfigContextManager()
        return self._inner.__enter__()

    def __exit__(self, *exc):
        return self._inner.__exit__(*exc)


class SweepBackend(Backend):
    """Ray's torch backend where a process group is needed (several workers), nothing otherwise:
    a one-worker trial has no peer to talk to."""

    def on_start(self, worker_group, backend_config: "SweepBackendConfig") -> None:
        if len(worker_group) > 1:
            from ray.train.torch.config import TorchConfig, _TorchBackend

            _TorchBackend().on_start(worker_group, TorchConfig(timeout_s=backend_config.timeout_s))

    def on_shutdown(self, worker_group, backend_config: "SweepBackendConfig") -> None:
        if len(worker_group) > 1:
            from ray.train.torch.config import TorchConfig, _TorchBackend

            _TorchBackend().on_shutdown(worker_group, TorchConfig(timeout_s=backend_config.timeout_s))


class SweepBackendConfig(BackendConfig):
    """Ray Train's backend config for a trial (in place of TorchConfig, whose module imports torch)."""

    timeout_s: int = 1800

    @property
    def backend_cls(self):
        return SweepBackend

    @property
    def train_func_context(self):
        return _DeviceContext


class ForwardReports(UserCallback):
    """In Train's controller: append each epoch a report carries (rank 0's metrics, unpacked: see
    raysweep.reporting) as a JSON line to a file the trial function reads. The controller runs
    in the trial function's process (SweepTrainer; from a driver, Ray starts it on the caller's
    node), so a local file joins them, and the controller never waits on Tune."""

    def __init__(self, path: str):
        self.path = path

    def after_report(self, run_context, metrics, checkpoint) -> None:
        lines = "".join(json.dumps(row, default=str) + "\n" for row in unpack(metrics[0]))
        with open(self.path, "a") as f:
            f.write(lines)


# fit() from a driver (Ray's way, see SweepTrainer): how often Train's placement-group cleaner
# asks whether the controller still lives. Each ask is a State API query through the dashboard;
# at Ray's default, every second, the cleaner took 1.5-3.4% of a core on a 2-core machine while
# a trial trained (~1%, an idle process's cost, at 10 s). A dead controller's placement group is
# freed this much later. (In a sweep, no cleaner runs: raysweep.placement.)
PG_CHECK_INTERVAL_S = 10.0


def _placement_group_cleaner():
    """Train's placement-group cleaner callback, checking every PG_CHECK_INTERVAL_S, and not
    waiting at the end of a run for its check to come round (up to that interval): it is told to
    stop and left to exit. None if this Ray has no such callback."""
    try:
        from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
    except ImportError:
        return None

    class Cleaner(PlacementGroupCleanerCallback):
        def _stop_cleaner(self):
            cleaner, self._cleaner = self._cleaner, None
            if cleaner is not None:
                cleaner.stop.remote()

    return Cleaner(check_interval_s=PG_CHECK_INTERVAL_S)


class _Ready:
    """An actor method's stand-in: `.remote(...)` runs it in the caller and returns its value as
    a ready ObjectRef, so `ray.get(x.method.remote(...))` reads as it does for an actor."""

    def __init__(self, fn):
        self._fn = fn

    def remote(self, *args, **kwargs):
        import ray

        return ray.put(self._fn(*args, **kwargs))


class SoleWorkerSync:
    """Train's SynchronizationActor for a group of one worker, without the actor.

    The actor is a barrier: each rank calls `broadcast_from_rank_zero` (at every report that
    carries a checkpoint, and at `ray.train.collective` calls) and waits until every rank has,
    then gets rank 0's value. With one rank the barrier opens at once with the caller's own
    value, so this answers in the caller's process. Train starts the actor for every worker
    group, one worker or many: a process per trial that, while the trial trains, wakes ~150 times
    a second (Ray's own timers) on the cores the trial trains on. `reset` and
    `set_required_ranks` (worker replacement, preemption) have nothing to release either.
    """

    @property
    def broadcast_from_rank_zero(self) -> _Ready:
        return _Ready(lambda *, data=None, **_: data)

    @property
    def reset(self) -> _Ready:
        return _Ready(lambda: None)

    @property
    def set_required_ranks(self) -> _Ready:
        return _Ready(lambda ranks: True)


class _SoleWorkerSyncClass:
    """Stands where Train's worker group starts its synchronisation actor
    (`SynchronizationActor.options(...).remote(...)`), and makes a SoleWorkerSync instead."""

    def options(self, **_):
        return self

    def remote(self, *_, **__) -> SoleWorkerSync:
        return SoleWorkerSync()


@contextlib.contextmanager
def sole_worker_sync():
    """While inside: the worker groups Train starts in this process have a SoleWorkerSync for a
    synchronisation actor. For one-worker runs only, in the process that runs their controller."""
    from ray.train.v2._internal.execution.worker_group import state, worker_group

    actor_cls, shutdown = worker_group.SynchronizationActor, state._shutdown_sync_actor

    def shutdown_sync(sync) -> None:
        if not isinstance(sync, SoleWorkerSync):
            shutdown(sync)

    worker_group.SynchronizationActor, state._shutdown_sync_actor = _SoleWorkerSyncClass(), shutdown_sync
    try:
        yield
    finally:
        worker_group.SynchronizationActor, state._shutdown_sync_actor = actor_cls, shutdown


class SweepTrainer(DataParallelTrainer):
    """Ray Train's data-parallel trainer, with its controller in the calling actor's process
    (Tune's trial actor) rather than an actor of its own, less the dataset manager actor that
    serves `datasets=` (a trial passes none: its workers read their own data, so the actor only
    cost a process). Run that way it also starts neither of Train's other helper actors: a
    one-worker run's synchronisation actor (SoleWorkerSync) and the placement-group cleaner
    (RecordPlacementGroup, with the sweep's driver freeing a dead trial's group)."""

    def _in_actor(self) -> bool:
        import ray

        return ray.get_runtime_context().get_actor_id() is not None

    def _initialize_and_run_controller(self, **controller_init_kwargs):
        """Run Train's controller in this process when it is an actor (Tune's trial actor, which
        only waits on fit() meanwhile), not in an actor of its own (Ray's way, kept for fit()
        called from a driver).

        Ray starts the controller as an actor on this node that only polls the workers and
        handles their reports, from an asyncio loop. In a process of its own it cost every trial
        a process start and the imports of Ray Train before anything else could start (~1 s of
        `time_launch_s` here), and, while the trial trained, ~1% of a core and ~150 wake-ups a
        second (a Ray worker's own timers), each one a preempted training thread on a CPU
        trial that uses every core. Here it runs the same loop in fit()'s thread. What an actor
        of its own gave and this keeps: the workers answer to the actor that runs the loop (now
        Tune's trial actor), so killing the trial still ends them; their placement group is
        freed by the sweep's driver then (RecordPlacementGroup). What it does not keep: a
        worker's `ray.train.get_all_reported_checkpoints()` calls the controller's actor, which
        raysweep's loop never does.
        """
        import asyncio

        if not self._in_actor():
            return super()._initialize_and_run_controller(**controller_init_kwargs)
        from ray.train.v2._internal.execution.controller import TrainController

        controller = TrainController(**controller_init_kwargs)
        sole = self.scaling_config.num_workers == 1
        with sole_worker_sync() if sole else contextlib.nullcontext():
            asyncio.run(controller.run())
        return controller.get_result()

    def _create_default_callbacks(self):
        # The driver frees a dead trial's placement group from a file in the run's directory:
        # local (or mounted) storage only; elsewhere Train's cleaner stays.
        record = self._in_actor() and "://" not in str(self.run_config.storage_path)
        callbacks = []
        for c in super()._create_default_callbacks():
            name = type(c).__name__
            if name == "DatasetsCallback":
                continue
            if name == "PlacementGroupCleanerCallback":
                if record:
                    from raysweep.placement import PLACEMENT_GROUP_FILE, RecordPlacementGroup

                    run_dir = Path(self.run_config.storage_path) / self.run_config.name
                    c = RecordPlacementGroup(run_dir / PLACEMENT_GROUP_FILE)
                else:
                    c = _placement_group_cleaner() or c
            callbacks.append(c)
        return callbacks


def train_run_name(trial_id: str) -> str:
    """The name of a Tune trial's Train run (its directory under the sweep's Train storage): one
    per trial, so a retried or resumed trial finds its own checkpoints."""
    return f"trial_{trial_id}"


def _forward_to_tune(path: Path, fitting) -> None:
    """Report every line the controller appends to `path` to Tune, in order, until `fitting`
    (the thread running fit()) has ended and the file is read to its end."""
    import ray.tune

    pending = ""
    with open(path) as f:
        while True:
            done = not fitting.is_alive()  # before the read: every report fit() wrote is in it
            chunk = f.read()
            pending += chunk
            *lines, pending = pending.split("\n")
            for line in lines:
                ray.tune.report(json.loads(line))
            if not chunk:
                if done:
                    return
                time.sleep(0.1)


def _worker_loop(config: dict) -> None:
    """The worker's entry: the loop and torch load here, in the process that trains."""
    from raysweep.train import train_loop_per_worker

    train_loop_per_worker(config)


def build_trainer(cfg: Config, prepared, fraction: float, seed: int, *, use_gpu: bool,
                  run_config: "ray.train.RunConfig", gpus_per_worker: float = 1.0, num_workers: int = 1,
                  token: str = "",
                  trial_start: float | None = None, precision: str | None = None,
                  reserve_bytes: int | None = None) -> SweepTrainer:
    """The trainer of one (fraction, seed) trial over a `PreparedData`: Ray Train's data-parallel
    trainer running `raysweep.train.train_loop_per_worker` with a torch backend (SweepBackend).

    The workers read their own data (see `_load_data`): a trial passes Train no datasets, so
    Train starts no split coordinator, and reads happen on the node that trains.
    """
    import uuid

    from ray.train import ScalingConfig

    from raysweep.data import stratified_subset
    from raysweep.gpu import DEFAULT_RESERVE_BYTES

    if use_gpu and not gpus_per_worker > 0:
        raise RaysweepError(f"use_gpu needs a positive GPU share per worker, got {gpus_per_worker}")
    if num_workers < 1:
        raise RaysweepError(f"a trial needs at least one worker, got num_workers={num_workers}")
    labels = prepared.labels("train")
    n_train = len(stratified_subset(labels, fraction, seed))
    if n_train < num_workers:
        raise RaysweepError(f"fraction {fraction:g} holds {n_train} training images: fewer than the "
                            f"{num_workers} workers of a trial")
    config = {"train": asdict(cfg.train), "model": asdict(cfg.model), "fraction": float(fraction),
              "seed": int(seed), "prepared": prepared, "num_classes": int(prepared.num_classes),
              "n_train": n_train, "n_full": len(labels), "n_val": len(prepared.labels("validation")),
              "n_test": len(prepared.labels("test")), "image_size": int(prepared.image_size),
              "select_metric": select_metric(cfg.train.select_metric, prepared.num_classes),
              "checkpoint_every": cfg.sweep.checkpoint_every, "token": token or uuid.uuid4().hex,
              "trial_start": trial_start or time.time(), "precision": precision,
              "gpu_share": gpus_per_worker if use_gpu else 0.0,
              "reserve_bytes": int(reserve_bytes or DEFAULT_RESERVE_BYTES)}
    resources = {"CPU": cfg.sweep.cpus_per_trial, **({"GPU": gpus_per_worker} if use_gpu else {})}
    return SweepTrainer(
        _worker_loop, train_loop_config=config, backend_config=SweepBackendConfig(),
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=run_config)


# Env vars the Train controller reads (Ray Train propagates them from the process that calls
# fit). Its poll collects reports: Ray's default, 2 s, delays each report (and a trial's end)
# by up to 2 s. The loop no longer waits for it (raysweep.reporting), and each poll wakes the
# controller and the worker: 0.5 s, half the loop's REPORT_EVERY_S. The preemption watcher is
# one more actor per trial, for spot preemption notices a sweep does not use; Train's
# Prometheus metrics cost every report a little, for dashboards a sweep has its own display
# for. A value the user set wins.
TRAIN_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
             "RAY_TRAIN_METRICS_ENABLED": "0"}


def _worker_threads(cfg: Config, plan) -> int:
    """OpenMP threads a CPU trial's workers start with (1: Ray's default; GPU trials: 1)."""
    if plan is None or plan.use_gpu:
        return 1
    return int(cfg.train.num_threads or plan.torch_threads or 1)


def worker_env_vars(threads: int, use_gpu: bool) -> dict[str, str]:
    """Environment variables a trial's Train workers start with.

    - OMP_NUM_THREADS: OpenMP sizes its pool when a process starts, and Ray starts workers with 1
      (measured: ~12% faster epochs with the trial's count).
    - MALLOC_ARENA_MAX=1: Train runs the loop in a thread of its own, and glibc gives such a
      thread an arena built of 64 MB heaps, each unmapped as soon as it empties, whatever mallopt
      says (keep_freed_memory governs the main arena). Whether a step's activations then spilled
      into a fresh heap depended on what else the arena held: in 2 of 5 identical bench trials,
      ~180,000 page faults a second and 1,016-1,030 img/s, against 1,300+ in the others (strace:
      a 128 MB heap mapped and 64 MB unmapped every few steps). With one arena, the main one,
      for every thread: 5 of 5 trials at ~4 faults a second (tests/test_runner.py shows it).
      CPU trials only: a GPU trial's activations live on the GPU.
    - RAY_DATA_USAGE_DISABLED=1: Ray Data's usage collection starts a thread in the process that
      loads the data (the worker) that queries Prometheus every 10 s for the rest of the trial,
      and writes a usage record to the GCS at every load, for statistics Ray's authors collect.
      Ray's own usage-stats setting (RAY_USAGE_STATS_ENABLED) stays the user's.
    """
    env = {"RAY_DATA_USAGE_DISABLED": "1"}
    if not use_gpu:
        env["MALLOC_ARENA_MAX"] = "1"
    if threads > 1:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def run_trial(params: dict, *, cfg_dict: dict, prepared, plan, train_storage: str, gpu_setup: dict) -> None:
    """One Tune trial: build this (fraction, seed)'s trainer, fit it, and pass its reports to Tune.

    The Train run is named after the trial id, so a retried or resumed trial finds its own
    checkpoints under the same (storage_path, name) and continues from them. Reports travel
    from Train's controller through a file it appends to (`ForwardReports`) and are reported to
    Tune from this function's own thread, in order; it returns only once every one is in, so
    Tune's end-of-trial marker always comes after the last epoch. (Ray's TuneReportCallback
    hands them over through a one-slot queue that races that marker: the last epoch of a
    trial went missing when two trials ran at once.)
    """
    trial_start = time.time()
    import tempfile
    import threading
    import uuid

    import ray.data
    import ray.train
    import ray.tune

    for key, value in TRAIN_ENV.items():
        os.environ.setdefault(key, value)
    cfg = Config.from_dict(cfg_dict)
    # One progress display for the sweep (the driver's): per-trial Ray Data bars would flood it.
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    trial_id = ray.tune.get_context().get_trial_id()
    handle, reports = tempfile.mkstemp(prefix="raysweep-reports-", suffix=".jsonl")
    os.close(handle)
    # The workers start with worker_env_vars. Train gives its workers a runtime env of
    # their own anyway (the env vars it propagates: they never reuse an idle process), so neither
    # this nor the hook that imports torch while Train sets the worker up (raysweep.warm) costs a
    # process start.
    threads = _worker_threads(cfg, plan)
    worker_env = {"env_vars": worker_env_vars(threads, plan.use_gpu)}
    worker_env["worker_process_setup_hook"] = "raysweep.warm.warm_worker"
    run_config = ray.train.RunConfig(
        name=train_run_name(trial_id),
        storage_path=train_storage,
        worker_runtime_env=worker_env,
        callbacks=[ForwardReports(reports)],
        checkpoint_config=checkpoint_config(cfg.sweep.keep_checkpoints),
        failure_config=ray.train.FailureConfig(max_failures=cfg.sweep.max_failures),
    )
    fraction = float(params["fraction"])
    trainer = build_trainer(cfg, prepared, fraction, int(params["seed"]), use_gpu=plan.use_gpu,
                            gpus_per_worker=plan.gpu_share(fraction) if plan.use_gpu else 0.0,
                            num_workers=plan.num_workers, run_config=run_config,
                            token=uuid.uuid4().hex, trial_start=trial_start, **gpu_setup)
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
