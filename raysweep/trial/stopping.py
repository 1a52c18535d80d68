"""When a trial stops (or, under the plateau schedule, lowers its learning rate): early
stopping on the select metric, with patience counted in epochs and in optimizer steps.

Pure: it sees each epoch's metrics and the optimizer's step count, and knows nothing of torch
or Ray. Its state travels in checkpoints (`state_dict`).
"""

from __future__ import annotations

import math

from raysweep.config import TrainConfig


def rank_key(m: dict[str, float], metric: str) -> tuple[float, ...]:
    """Order of epochs by quality: the select metric decides; ties (common on small sets) go to
    top-1, then loss. A NaN (diverged) epoch is never the best."""
    return tuple(math.inf if math.isnan(v) else v for v in (m[metric], m["val_top1_error"], m["val_loss"]))


class StopRule:
    """A plateau: no new best of the select metric for `patience` epochs (since the last lr drop
    too), nor for as many optimizer steps as `patience` passes over the whole training split
    take (`pass_steps`): a 1/16 subset's epoch is a handful of steps, too few to call it
    converged. Under the plateau schedule a plateau lowers the lr, `plateau_drops` times;
    otherwise, or after those, it ends the trial. patience 0: never stops early."""

    KEYS = ("best_epoch", "best", "drops", "last_drop", "best_step", "drop_step")

    def __init__(self, tc: TrainConfig, metric: str, pass_steps: int):
        self.tc, self.metric, self.pass_steps = tc, metric, max(1, int(pass_steps))
        self.best_epoch, self.best = 0, None
        self.drops = self.last_drop = self.best_step = self.drop_step = 0

    def improved(self, epoch: int, metrics: dict, steps: int) -> bool:
        """Record epoch's metrics; True if it is the best so far."""
        if self.best is not None and not rank_key(metrics, self.metric) < rank_key(self.best, self.metric):
            return False
        self.best_epoch, self.best_step = epoch, steps
        self.best = {k: metrics[k] for k in (self.metric, "val_top1_error", "val_top5_error", "val_loss")}
        return True

    def decide(self, epoch: int, steps: int) -> str:
        """"go", "drop_lr" (the caller lowers it) or "stop", after `improved` for this epoch."""
        tc = self.tc
        if not (tc.patience and epoch - max(self.best_epoch, self.last_drop) >= tc.patience
                and steps - max(self.best_step, self.drop_step) >= tc.patience * self.pass_steps):
            return "go"
        if tc.schedule == "plateau" and self.drops < tc.plateau_drops:
            self.drops, self.last_drop, self.drop_step = self.drops + 1, epoch, steps
            return "drop_lr"
        return "stop"

    def state_dict(self) -> dict:
        return {"best_epoch": self.best_epoch, "best_metrics": self.best, "drops": self.drops,
                "last_drop": self.last_drop, "best_step": self.best_step, "drop_step": self.drop_step}

    def load_state_dict(self, state: dict) -> None:
        self.best_epoch, self.best = state["best_epoch"], state["best_metrics"]
        self.drops, self.last_drop = state.get("drops", 0), state.get("last_drop", 0)
        self.best_step, self.drop_step = state.get("best_step", 0), state.get("drop_step", 0)
