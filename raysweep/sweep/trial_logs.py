"""Tune's per-trial files (result.json, progress.csv, TensorBoard events) with every epoch once.

A trial's worker replays the epochs its checkpoint recorded whenever it restarts: a failed
worker, a failed trial, a resumed sweep. Tune's own loggers append whatever arrives, and on a
resume keep only what they had synced, so epochs went missing or twice. These replace them:
each time Tune starts a trial they begin its files afresh (the replay refills them), and they
drop an epoch they have already written, keeping the values of its first report.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict

from ray.air.constants import EXPR_PROGRESS_FILE, EXPR_RESULT_FILE, TRAINING_ITERATION
from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback, TBXLoggerCallback

from raysweep.sweep import ray_compat

TB_PATTERN = "events.out.tfevents.*"


class _EveryEpochOnce:
    """Mixin: fresh files at each trial start, and one row per epoch."""

    def _forget(self, trial) -> None:
        """Remove what earlier starts of this trial wrote; the worker's replay rewrites it."""
        raise NotImplementedError

    def on_trial_start(self, iteration, trials, trial, **info):
        self._logged_epochs()[trial] = set()
        self.log_trial_end(trial)  # close any handle from an earlier start of this trial
        ray_compat.fresh_trial_dir(trial)
        self._forget(trial)
        super().on_trial_start(iteration, trials, trial, **info)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        epoch = result.get("epoch")
        seen = self._logged_epochs().setdefault(trial, set())
        if epoch is not None:
            if epoch in seen:
                return
            seen.add(epoch)
        super().on_trial_result(iteration, trials, trial, result, **info)

    def _logged_epochs(self) -> Dict:
        if not hasattr(self, "_epochs"):
            self._epochs = {}
        return self._epochs


def _remove_staged(trial, name: str) -> None:
    Path(trial.local_path, name).unlink(missing_ok=True)


class ResultJsonLogger(_EveryEpochOnce, JsonLoggerCallback):
    """result.json: one JSON line per epoch."""

    def _forget(self, trial) -> None:
        _remove_staged(trial, EXPR_RESULT_FILE)


class ProgressCsvLogger(_EveryEpochOnce, CSVLoggerCallback):
    """progress.csv: one row per epoch."""

    def _forget(self, trial) -> None:
        _remove_staged(trial, EXPR_PROGRESS_FILE)


class TensorBoardLogger(_EveryEpochOnce, TBXLoggerCallback):
    """TensorBoard scalars, one point per epoch, with the epoch as the step."""

    def _forget(self, trial) -> None:
        # A new writer makes a new events file, and TensorBoard reads every file in the folder:
        # remove the earlier starts' files, here and in the storage they were synced to.
        for path in Path(trial.local_path).glob(TB_PATTERN):
            path.unlink(missing_ok=True)
        fs, remote = trial.storage.storage_filesystem, trial.storage.trial_fs_path
        if fs.type_name == "local":
            for path in Path(remote).glob(TB_PATTERN):
                path.unlink(missing_ok=True)

    def log_trial_result(self, iteration: int, trial, result: Dict):
        if "epoch" in result:
            result = {**result, TRAINING_ITERATION: result["epoch"]}
        super().log_trial_result(iteration, trial, result)


def trial_loggers() -> list:
    """The three loggers, in place of Tune's defaults (Tune adds its own only when a kind is missing)."""
    return [ResultJsonLogger(), ProgressCsvLogger(), TensorBoardLogger()]
