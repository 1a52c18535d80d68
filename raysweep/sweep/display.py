"""The sweep's one display: a line per trial as it starts and ends, and a bar for the whole
sweep (trials and epochs done, elapsed time, ETA). A Ray Tune callback in the driver.

Epochs are counted once each, however often a restarted trial replays them; with early
stopping the epoch total is a cap that shrinks as trials stop. The ETA comes from the wall
time of the trials that have finished.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import TextIO

from ray.tune import Callback

from raysweep.console import Progress, format_duration
from raysweep.sweep.summary import point
from raysweep.sweep.trainer import WORKER_FAILURE


def _pct(x) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


class SweepDisplay(Callback):
    """`plan` maps (fraction, width, seed) -> {"n_train": int, "max_epochs": int, "num_params": int}
    for every grid point; `metric` is the validation error shown (e.g. "val_top1_error"). `quiet`
    prints nothing. Widths are named in each line when the grid has several. `train_runs` (the
    sweep's Train storage) is where a trial that resumes has its checkpoints."""

    def __init__(self, plan: dict[tuple[float, float, int], dict], metric: str, *, quiet: bool = False,
                 stream: TextIO | None = None, done: set | None = None, concurrency: int = 1,
                 default_width: float = 1.0, train_runs: str | Path | None = None):
        self.plan, self.metric, self.default_width = plan, metric, default_width
        self.several_widths = len({k[1] for k in plan}) > 1
        self.train_runs = Path(train_runs) if train_runs else None
        self.stream = stream or sys.stdout
        self.epochs: dict[str, set[int]] = {}
        self.concurrency = concurrency
        self.started: dict[tuple[float, int], float] = {}  # grid point -> time.monotonic() at start
        self.durations: dict[tuple, list[float]] = {}  # (fraction, width) -> wall seconds of finished trials
        self.finished = set(done or ())  # grid points finished before a resume
        self.finished_before = len(self.finished)
        self.number: dict[str, int] = {}
        # Trials that had finished but that Tune starts again: an interrupt landed between their
        # last report and Tune marking them done. They only re-report their epochs from their
        # final checkpoint (nothing trains); they keep their place among the finished.
        self.replays: set[str] = set()
        total = sum(p["max_epochs"] for key, p in plan.items() if key not in self.finished)
        self.bar = Progress(total, "sweep", "epochs", stream=self.stream, every_s=30.0, enabled=not quiet,
                            own_eta=False)
        self._postfix()

    # Tune pickles its RunConfig, callbacks included, into the experiment; a display belongs to
    # the driver that made it (a resumed sweep makes a new one), so it pickles to nothing.
    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__({}, "val_top1_error", quiet=True)

    # --- what a trial is -------------------------------------------------------------
    def _key(self, trial) -> tuple[float, float, int]:
        return point(trial.config, self.default_width)

    def _label(self, trial) -> str:
        f, w, s = key = self._key(trial)
        p = self.plan.get(key, {})
        n, params = p.get("n_train"), p.get("num_params")
        width = f"width {w:<5g} ({params / 1e6:.2f} M params) " if self.several_widths and params else \
            f"width {w:g} " if self.several_widths else ""
        return f"fraction {f:<7g} {width}seed {s:<3d} n_train {n:>7,}" if n else f"fraction {f:g} {width}seed {s}"

    def _tag(self, trial) -> str:
        if trial.trial_id not in self.number and trial.trial_id not in self.replays:
            self.number[trial.trial_id] = len(self.number) + self.finished_before + 1
        number = "-" if trial.trial_id in self.replays else self.number[trial.trial_id]
        return f"[{number:>{len(str(len(self.plan)))}}/{len(self.plan)}]"

    def resumes_from(self, trial) -> int | None:
        """The last epoch in the trial's newest complete checkpoint (its history.json), which its
        Train run restores from; None for a trial with none (it starts from scratch)."""
        from raysweep.sweep.trainer import train_run_name

        if self.train_runs is None:
            return None
        epochs = []
        for d in (self.train_runs / train_run_name(trial.trial_id)).glob("checkpoint_*"):
            try:  # a checkpoint cut short by the stop has no history yet: Train does not restore it
                history = json.loads((d / "history.json").read_text())
            except (OSError, ValueError):
                continue
            epochs += [int(history[-1]["epoch"])] if history else []
        return max(epochs, default=None)

    # --- Tune's hooks ------------------------------------------------------------------
    def on_trial_start(self, iteration, trials, trial, **info):
        key = self._key(trial)
        epoch = self.resumes_from(trial)
        if key in self.finished and trial.trial_id not in self.number:
            self.replays.add(trial.trial_id)
            self.bar.write(f"{self._tag(trial)} replay {self._label(trial)}  (it had finished: its "
                           f"{epoch or 'final'} epochs are re-reported from its last checkpoint, nothing trains)")
            return
        self.started.setdefault(key, time.monotonic())
        self.epochs.setdefault(trial.trial_id, set())
        cap = self.plan.get(key, {}).get("max_epochs")
        what = "start " if epoch is None else f"resume (from epoch {epoch})"
        self.bar.write(f"{self._tag(trial)} {what} {self._label(trial)}" + (f"  (up to {cap} epochs)" if cap else ""))

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if result.get(WORKER_FAILURE):  # Ray Train restarts the worker in this same Tune trial
            self.bar.write(f"{self._tag(trial)} retry  {self._label(trial)}: {result[WORKER_FAILURE]}; "
                           "Ray Train resumes it from its last checkpoint")
        epoch = result.get("epoch")
        if trial.trial_id in self.replays:  # its epochs were counted before the stop
            return
        seen = self.epochs.setdefault(trial.trial_id, set())
        if epoch is None or epoch in seen:
            return
        seen.add(epoch)
        self.bar.update(1)
        if "stopped_early" in result:  # the last epoch: the rest of its cap will never run
            cap = self.plan.get(self._key(trial), {}).get("max_epochs", len(seen))
            self.bar.set_total(self.bar.total - max(0, cap - len(seen)))
        self._postfix()

    def on_trial_complete(self, iteration, trials, trial, **info):
        if trial.trial_id in self.replays:
            return
        key = self._key(trial)
        self.finished.add(key)
        if key in self.started:
            self.durations.setdefault(key[:2], []).append(time.monotonic() - self.started[key])
        r = trial.last_result or {}
        metric = r.get("select_metric", self.metric)
        test = metric.replace("val_", "test_")
        stop = "stopped early" if r.get("stopped_early") else "epoch cap"
        learned = "" if r.get("learned", True) else "  NOT LEARNED (near chance)"
        self.bar.write(
            f"{self._tag(trial)} done   {self._label(trial)}  {r.get('epoch', '?')} epochs "
            f"(best {r.get('best_epoch', '?')}, {stop})  {metric.replace('_', ' ')} {_pct(r.get('best_val_error'))}"
            f"  {test.replace('_', ' ')} {_pct(r.get(test))}  {format_duration(r.get('wall_time_s'))}{learned}")
        self._postfix()

    def on_trial_recover(self, iteration, trials, trial, **info):
        # Tune retries it from its last checkpoint; its traceback is in error.txt (Tune prints it
        # only under --verbose).
        allowed = getattr(trial, "max_failures", 0)
        of = f" of {allowed} allowed" if allowed >= 0 else ""
        self.bar.write(f"{self._tag(trial)} retry  {self._label(trial)}: failure {trial.num_failures}{of}, "
                       f"resuming from its last checkpoint; see {trial.path}/error.txt")

    def on_trial_error(self, iteration, trials, trial, **info):
        self.finished.add(self._key(trial))
        self.bar.write(f"{self._tag(trial)} FAILED {self._label(trial)}: see {trial.path}/error.txt")
        self._postfix()

    def on_experiment_end(self, trials, **info):
        self.bar.close()

    # --- the bar -------------------------------------------------------------------------
    def _postfix(self) -> None:
        """ETA from trial durations: a trial's epochs are unknown until it stops (early stopping),
        but its wall time is steadier: every trial stops after a similar number of steps. Each
        trial still to run is expected to take what finished trials of its fraction took (or of
        any fraction), running ones the rest of that, `concurrency` at a time."""
        now = time.monotonic()
        done_any = [d for ds in self.durations.values() for d in ds]
        if not done_any:
            self.bar.set_postfix(f"trials {len(self.finished)}/{len(self.plan)} done, ETA after the first trial ends")
            return

        def expected(key) -> float:
            same = self.durations.get(key[:2])
            return sum(same) / len(same) if same else sum(done_any) / len(done_any)

        running = {key: now - t for key, t in self.started.items() if key not in self.finished}
        work = sum(max(0.0, expected(k) - age) for k, age in running.items())
        work += sum(expected(k) for k in self.plan if k not in self.finished and k not in running)
        eta = work / max(1, self.concurrency)
        self.bar.set_postfix(f"trials {len(self.finished)}/{len(self.plan)} done, ETA {format_duration(eta)}")
