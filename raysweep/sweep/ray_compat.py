"""Everything raysweep asks of Ray beyond its public API, in one place, for one Ray version.

raysweep builds on stock Ray: Tune's `Tuner` and callbacks, Train's `TorchTrainer`,
`ScalingConfig`, `RunConfig`, and Ray Data. What stays here is kept only because it protects
correctness or the GPU's time; each item says which. `RAYSWEEP_STOCK_RAY=1` turns every item
off (the sweep still runs: tests/test_ray_compat.py runs one that way), and
tests/test_ray_compat.py fails `make test` if a Ray upgrade moves any name listed below.

| item | Ray name it relies on | why it is kept | without it |
|---|---|---|---|
| `local_ray_exited` | `ray._private.worker._global_node.all_processes` | correctness: a SIGTERM sent to the whole process group (a batch scheduler's limit, `timeout`) also ends the Ray this driver started; the driver then prints its `--resume` line and exits instead of hanging on a GCS that is gone | the driver waits ~1 min, then dies with a C++ stack trace and no resume line |
| `replace_restored_callbacks` | `Tuner._local_tuner.get_run_config()` | correctness: `Tuner.restore` brings back the callbacks pickled at the start (the old display, loggers, MLflow); this run's must replace them, and `restore` takes none | a resumed sweep's console shows nothing of the run; its epochs go through the old loggers' state |
| `fresh_trial_dir` | `Trial.init_local_path()` (DeveloperAPI) | correctness: result.json / progress.csv / TensorBoard hold every epoch once after a worker restart or a resume (raysweep.sweep.trial_logs) | Tune's loggers append the replayed epochs again, or drop unsynced ones |
| `in_place_checkpoints` | Train's storage layout `<storage_path>/<name>/<checkpoint_dir_name>` (`StorageContext.build_checkpoint_path_from_name`) with `CheckpointUploadMode.NO_UPLOAD` | GPU time: a checkpoint is written once, where Train keeps it, and registered with `CheckpointUploadMode.NO_UPLOAD`; the stock path writes a temp dir that Train then copies (AlexNet's state with momentum: ~0.5 GB per checkpoint, while the GPU waits) | each checkpoint is written twice |
| `QUIET_LOGGERS` | logger names `ray._private.authentication.authentication_token_setup`, `ray.data._internal.progress` | console: the token notice at every `ray.init`, and Ray Data's "progress bars disabled" warning (raysweep's own display replaces Ray Data's bars) | two extra lines per sweep |
| `ENV_DEFAULTS` | the environment variables in the table below | see each | see each |

Environment defaults: set with `os.environ.setdefault` (a value the user set wins), in the
process named under "where", before Ray reads them.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from typing import Any

TESTED_RAY = "2.60.0"
STOCK_ENV = "RAYSWEEP_STOCK_RAY"


def stock() -> bool:
    """True when RAYSWEEP_STOCK_RAY=1: nothing in this module changes Ray's behaviour."""
    return os.environ.get(STOCK_ENV, "") == "1"


@dataclass(frozen=True)
class EnvDefault:
    name: str
    value: str
    where: str  # "driver": the sweep's process, before Tune starts; "worker": a CPU trial's Train workers
    reason: str
    effect: str
    read_by_ray: bool = True  # a Ray setting (its name must exist in Ray's source), or the C library's
    console: bool = False  # only shapes the console: left to Ray under --verbose
    local: bool = False  # only where this sweep starts its own Ray (no --address)


ENV_DEFAULTS: tuple[EnvDefault, ...] = (
    EnvDefault("TUNE_GLOBAL_CHECKPOINT_S", "2", "driver",
               "correctness: Tune saves the experiment's state (trial states, results) at most this often; "
               "a driver killed hard loses what finished since (Tune's default: 10 s or more)",
               "a few ms per save for a grid of tens of trials"),
    EnvDefault("TUNE_PRINT_ALL_TRIAL_ERRORS", "0", "driver",
               "console: a failed trial's traceback goes to its error.txt, which the display's retry and "
               "FAILED lines name (--verbose prints it too)", "~20 lines less per failure", console=True),
    EnvDefault("RAY_AIR_NEW_OUTPUT", "0", "driver",
               "console: Tune's classic output engine is silent at verbose=0; the new one prints a config box "
               "and a status table over raysweep's own display (--verbose keeps Ray's)", "no Tune tables", console=True),
    EnvDefault("TUNE_WARN_THRESHOLD_S", "5", "driver",
               "console: Tune warns in the console whenever one of its driver-side steps (a callback, a result) "
               "takes over 0.5 s, which a busy 2-core machine reaches while trials train; its own step times "
               "are not the user's problem", "no 'may be a performance bottleneck' WARNING lines", console=True),
    EnvDefault("RAY_worker_maximum_startup_concurrency", str(max(8, 4 * (os.cpu_count() or 1))), "driver",
               "console: each trial starts ~5 processes (Tune's actor, Train's controller and worker, Ray Data's "
               "readers); the raylet warns in the sweep's console once more than 4x its limit (one per CPU) "
               "start at once, which a 2-core machine reaches with two trials. Local clusters only (a joined "
               "cluster's raylets are configured where they run)", "no '(raylet) WARNING: N PYTHON worker "
               "processes have been started' lines", console=True, local=True),
    EnvDefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0", "driver",
               "CPU time: Train starts a preemption-watcher actor for every trial, to see a node being "
               "drained (a cloud's spot reclaim, an autoscaler's scale-down); the one machine of a local Ray "
               "started by this sweep is drained by nobody. Its process start costs ~2 CPU-s a trial, which "
               "2 cores pay in wall time. Local clusters only: a joined cluster keeps Train's default",
               "one process less per trial: 9.0 CPU-s in the 4 watchers of a 4-trial demo-width sweep "
               "(from /proc), none with it set", local=True),
    EnvDefault("MALLOC_ARENA_MAX", "1", "worker",
               "speed of CPU trials: Train runs the loop in a thread of its own, whose glibc arena unmapped "
               "its 64 MB heaps as soon as they emptied; activations then page-faulted afresh at every step",
               "2 of 5 bench trials ran at 1,016-1,030 img/s with ~180,000 page faults/s, against 1,300+ img/s "
               "with one arena (tests/test_runner.py shows the faults)", read_by_ray=False),
)


def apply_env_defaults(where: str, console: bool = True, local: bool = True) -> dict[str, str]:
    """Set this process's defaults for `where` ("driver"), the console ones only if `console`,
    the local-cluster ones only if `local` (this process starts its own Ray); returns what was
    set. No-op when stock."""
    if stock():
        return {}
    applied = {}
    for item in ENV_DEFAULTS:
        if (item.where == where and item.name not in os.environ and (console or not item.console)
                and (local or not item.local)):
            os.environ[item.name] = applied[item.name] = item.value
    return applied


def worker_env(use_gpu: bool) -> dict[str, str]:
    """The "worker" defaults for a trial's Train workers (CPU trials only: a GPU trial's
    activations live on the GPU). Empty when stock."""
    if stock() or use_gpu:
        return {}
    return {i.name: os.environ.get(i.name, i.value) for i in ENV_DEFAULTS if i.where == "worker"}


QUIET_LOGGERS = {
    "ray._private.authentication.authentication_token_setup": logging.ERROR,
    "ray.data._internal.progress": logging.ERROR,
}


def quiet_ray_logs() -> None:
    """Keep Ray's driver-side logs to real problems: no token notice at every start, no Ray Data
    INFO blocks, no notice that Ray Data's bars are off. Call before `ray.init`; `--verbose`
    CLIs skip it."""
    plain_ray_output()
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    if not stock():
        for name, level in QUIET_LOGGERS.items():
            logging.getLogger(name).setLevel(level)


def plain_ray_output() -> None:
    """No ANSI colour in what Ray prints unless stdout is a terminal: its `(raylet)` prefixes
    (RAY_COLOR_PREFIX, a documented Ray setting) and the rest, which it colours unconditionally
    (colorama, a Ray dependency, then strips escape codes from streams that are not terminals)."""
    from raysweep.console import interactive

    if not interactive(sys.stdout):
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
        import colorama

        colorama.init()


def check_version(stream=None) -> str | None:
    """One warning line if the installed Ray is not the one this module was written for."""
    import ray

    if ray.__version__ == TESTED_RAY:
        return None
    line = (f"raysweep: warning: Ray {ray.__version__} is installed; raysweep was tested with Ray {TESTED_RAY}. "
            f"If a sweep misbehaves, try {STOCK_ENV}=1 (stock Ray behaviour) and report it.")
    print(line, file=stream or sys.stderr, flush=True)
    return line


def local_ray_exited(wait_s: float = 0.5) -> bool:
    """True if this driver started Ray here and one of Ray's processes exits within `wait_s`.
    Measured: on a SIGTERM to the process group the dashboard and log monitor exit at once, the
    raylet drains for 10 s, then the driver's last calls wait on it. False when stock."""
    import time

    if stock():
        return False
    try:
        import ray._private.worker as ray_worker

        procs = [i.process for infos in ray_worker._global_node.all_processes.values() for i in infos]
    except Exception:  # noqa: BLE001  (no local node: joined a cluster)
        return False
    deadline = time.time() + wait_s
    while procs and time.time() < deadline:
        if any(p.poll() is not None for p in procs):
            return True
        time.sleep(0.05)
    return False


def replace_restored_callbacks(tuner, callbacks: list) -> None:
    """After `Tuner.restore`: this run's callbacks replace the ones pickled at the start."""
    if not stock():
        tuner._local_tuner.get_run_config().callbacks = callbacks


def fresh_trial_dir(trial) -> None:
    """Make sure a trial's local directory exists before its loggers rewrite their files."""
    trial.init_local_path()


def in_place_checkpoints(storage_path: str) -> bool:
    """Whether a trial's loop may write its checkpoints straight where Train keeps them:
    `<storage_path>/<run name>/<checkpoint_dir_name>` on a local (or mounted) file system, then
    registered with `CheckpointUploadMode.NO_UPLOAD`. False when stock, or for a URI (s3://...):
    a temp dir that Train uploads."""
    return not stock() and "://" not in str(storage_path)


# What tests/test_ray_compat.py checks in the installed Ray: module -> attributes, and the
# attributes of objects only reachable at run time (checked on a live instance there).
PRIVATE_SYMBOLS: dict[str, tuple[str, ...]] = {
    "ray._private.worker": ("_global_node",),
    "ray.tune.tuner": ("Tuner",),
    "ray.tune.experiment.trial": ("Trial",),
    "ray.data._internal.progress": ("get_progress_manager",),
    "ray._private.authentication.authentication_token_setup": (),
}
RUNTIME_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "ray._private.node.Node": ("all_processes",),
    "ray.tune.experiment.trial.Trial": ("init_local_path",),
    "ray.train.v2._internal.execution.storage.StorageContext": ("build_checkpoint_path_from_name",),
    "ray.tune.impl.tuner_internal.TunerInternal": ("get_run_config",),
    "ray.tune.tuner.Tuner": ("_local_tuner",),
}


def env_names() -> list[str]:
    return [i.name for i in ENV_DEFAULTS]


def describe() -> list[dict[str, Any]]:
    """The environment table as rows (for the manifest)."""
    return [{"name": i.name, "value": i.value, "where": i.where} for i in ENV_DEFAULTS]
