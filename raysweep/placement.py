"""A trial's placement group, freed by the sweep's driver if the trial's actor dies.

Ray frees a placement group when the job that made it ends, not when the actor that made it
dies. Ray Train's controller makes its worker group's, and Ray Train starts, for every run, a
detached actor that watches the controller and frees the group if it dies (its
PlacementGroupCleaner): a process per trial, waking ~150 times a second while the trial trains
(Ray's own timers), on the cores the trial trains on. A sweep already has a process that
outlives every trial, its driver. The controller (in Tune's trial actor: raysweep.trainer)
records its group's id in the Train run's directory (`RecordPlacementGroup`), and the driver
frees the group when Tune reports the trial failed, if it still stands (`FreePlacementGroups`).
"""

from __future__ import annotations

import os
from pathlib import Path

from ray import tune
from ray.train.v2._internal.execution.callback import WorkerGroupCallback

from raysweep.io import atomic_write_text
from raysweep.trainer import train_run_name

# In a Train run's directory: the id of its worker group's placement group.
PLACEMENT_GROUP_FILE = "placement_group"


class RecordPlacementGroup(WorkerGroupCallback):
    """In Train's controller (a trial's actor): write the id of each worker group's placement
    group to `path`, atomically, once the group has started (Ray Train's cleaner learns of it at
    the same point). A retried worker group's id replaces the last one's."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def after_worker_group_start(self, worker_group) -> None:
        pg = worker_group.get_worker_group_state().placement_group_handle.placement_group
        atomic_write_text(self.path, pg.id.hex())


def free_placement_group(path: str | os.PathLike) -> bool:
    """Free the placement group recorded at `path` (by RecordPlacementGroup) if it still stands;
    True if it did. Nothing recorded, or a group already gone (its run ended, or its job did),
    is not an error."""
    import ray
    from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

    try:
        pg = PlacementGroup(ray.PlacementGroupID.from_hex(Path(path).read_text().strip()))
    except (OSError, ValueError):
        return False
    if placement_group_table(pg).get("state") in (None, "REMOVED"):
        return False
    remove_placement_group(pg)
    return True


class FreePlacementGroups(tune.Callback):
    """In the sweep's driver: when Tune reports that a trial failed (or will be retried), free its
    worker group's placement group if it still stands. A trial whose actor died (killed, out of
    memory) leaves it, holding the trial's CPUs and GPUs until the sweep ends, so that later
    trials would wait for them forever. See RecordPlacementGroup."""

    def __init__(self, train_storage: str | os.PathLike):
        self.train_storage = Path(train_storage)

    def path(self, trial) -> Path:
        return self.train_storage / train_run_name(trial.trial_id) / PLACEMENT_GROUP_FILE

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        free_placement_group(self.path(trial))

    def on_trial_recover(self, iteration, trials, trial, **info) -> None:
        free_placement_group(self.path(trial))
