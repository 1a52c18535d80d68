"""When a trial stops (or, under the plateau schedule, lowers its learning rate).

A plateau is judged the same way for every subset size:
- on the select metric smoothed as an exponential moving average (`train.val_smoothing`), so
  the noise of a small validation split does not set the pace;
- with patience counted in epochs and in optimizer steps: no new smoothed best for `patience`
  epochs, nor for `patience` passes' worth of steps over the whole training split (a 1/16
  subset's epoch is a handful of steps, too few to call it converged);
- and never while the training loss still falls faster than `train.stop_loss_slope` nats per
  epoch: a large subset is not stopped while it is still learning (a small one reaches that
  point sooner, and its epochs are cheap). The fall is the least-squares slope over the last
  `loss_window(patience)` epochs, max(6, 2 x patience): an augmented epoch's training loss is
  noisy, and two endpoints a few epochs apart can show a flat loss that a longer fit does not.
  The wait is bounded: while the loss falls, the patience in epochs is `train.stop_loss_patience`
  times longer (4: 12 epochs for patience 3), after which a trial whose validation error has
  not improved is memorising its subset, not learning, and stops (0: no bound).

Pure: it sees each epoch's metrics and the optimizer's step count, and knows nothing of torch
or Ray. Its state travels in checkpoints (`state_dict`).
"""

from __future__ import annotations

import math

import numpy as np

from raysweep.config import TrainConfig


def rank_key(m: dict[str, float], metric: str) -> tuple[float, ...]:
    """Order of epochs by quality: the select metric decides; ties (common on small sets) go to
    top-1, then loss. A NaN (diverged) epoch is never the best."""
    return tuple(math.inf if math.isnan(v) else v for v in (m[metric], m["val_top1_error"], m["val_loss"]))


def loss_window(patience: int) -> int:
    """How many recent epochs the training loss's slope is fitted over."""
    return max(6, 2 * patience)


class StopRule:
    """`improved` records an epoch and says whether it is the best so far (raw: the tested
    checkpoint); `decide` says "go", "drop_lr" or "stop" (see the module's rule)."""

    def __init__(self, tc: TrainConfig, metric: str, pass_steps: int):
        self.tc, self.metric, self.pass_steps = tc, metric, max(1, int(pass_steps))
        self.best_epoch, self.best = 0, None
        self.drops = self.last_drop = self.drop_step = 0
        self.smooth, self.smooth_best, self.smooth_epoch, self.smooth_step = None, math.inf, 0, 0
        self.losses: list[tuple[int, int, float]] = []  # (epoch, steps, train_loss) of the recent epochs
        self.slope = math.nan  # the training loss's fall, nats per epoch, over the last window

    def improved(self, epoch: int, metrics: dict, steps: int) -> bool:
        value = metrics[self.metric]
        if not math.isnan(value):
            a = self.tc.val_smoothing
            self.smooth = value if self.smooth is None else a * self.smooth + (1 - a) * value
            if self.smooth < self.smooth_best:
                self.smooth_best, self.smooth_epoch, self.smooth_step = self.smooth, epoch, steps
        self.losses = [*self.losses, (epoch, steps, float(metrics["train_loss"]))][-loss_window(self.tc.patience):]
        self.slope = self._slope()
        if self.best is not None and not rank_key(metrics, self.metric) < rank_key(self.best, self.metric):
            return False
        self.best_epoch = epoch
        self.best = {k: metrics[k] for k in (self.metric, "val_top1_error", "val_top5_error", "val_loss")}
        return True

    def _slope(self) -> float:
        """The loss's fall per epoch (positive while it falls), fitted by least squares over the
        window; NaN until the window holds 3 finite epochs, and then the rule waits."""
        points = np.array([(e, x) for e, _, x in self.losses if math.isfinite(x)], dtype=float).reshape(-1, 2)
        if len(points) < 3 or np.ptp(points[:, 0]) == 0:
            return math.nan
        return float(-np.polyfit(points[:, 0], points[:, 1], 1)[0])

    def still_learning(self) -> bool:
        """The training loss still falls faster than train.stop_loss_slope per epoch."""
        return self.tc.stop_loss_slope > 0 and not self.slope < self.tc.stop_loss_slope

    def decide(self, epoch: int, steps: int) -> str:
        """"go", "drop_lr" (the caller lowers it) or "stop", after `improved` for this epoch."""
        tc = self.tc
        waited = epoch - max(self.smooth_epoch, self.last_drop)
        if not (tc.patience and waited >= tc.patience
                and steps - max(self.smooth_step, self.drop_step) >= tc.patience * self.pass_steps):
            return "go"
        if self.still_learning() and not (tc.stop_loss_patience and waited >= tc.stop_loss_patience * tc.patience):
            return "go"
        if tc.schedule == "plateau" and self.drops < tc.plateau_drops:
            self.drops, self.last_drop, self.drop_step = self.drops + 1, epoch, steps
            return "drop_lr"
        return "stop"

    def state_dict(self) -> dict:
        return {"best_epoch": self.best_epoch, "best_metrics": self.best, "drops": self.drops,
                "last_drop": self.last_drop, "drop_step": self.drop_step, "smooth": self.smooth,
                "smooth_best": self.smooth_best, "smooth_epoch": self.smooth_epoch,
                "smooth_step": self.smooth_step, "losses": self.losses}

    def load_state_dict(self, state: dict) -> None:
        self.best_epoch, self.best = state["best_epoch"], state["best_metrics"]
        self.drops, self.last_drop = state.get("drops", 0), state.get("last_drop", 0)
        self.drop_step = state.get("drop_step", 0)
        self.smooth, self.smooth_best = state.get("smooth"), state.get("smooth_best", math.inf)
        self.smooth_epoch = state.get("smooth_epoch", self.best_epoch)
        self.smooth_step = state.get("smooth_step", state.get("best_step", 0))
        self.losses = [tuple(x) for x in state.get("losses", [])]
        self.slope = self._slope()
