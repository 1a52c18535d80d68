"""`python -m raysweep.bench overhead`: what Ray costs around each epoch and each trial, measured
through a real sweep (`python -m raysweep.tune`, in a process of its own: Tune trials that fit
Train TorchTrainers).

The sweep runs a fast configuration (small images, a narrow AlexNet, small subsets, 100 epochs)
so that the machinery around the epochs is visible. Its trials' own metrics give the overhead
(epoch wall time minus training and evaluation, on epochs without a checkpoint), the checkpoint
cost and the time to the first optimizer step.

`in_trial_vs_bench_img_s` compares the trial's training speed with the same loop on the same
images in this process, outside Ray. A small machine's speed drifts by 10-20% over tens of
seconds, more than the effect measured, so the two are interleaved: while the largest trial
trains, the sweep's whole process tree (driver, Ray, the trial) is paused every few seconds for
a couple of epochs of the loop here, then resumed. The trial's epochs that overlap a pause (or
follow one closely) are left out. Each pause gives a ratio: the trial's img/s over the epochs
between it and the pauses either side, over the loop's in the pause; the figure is their median.
The pooled ratio (all the trial's epochs over all the loop's) is printed too.

Each pause first runs the loop with only the trial's worker stopped (Ray's other processes, the
driver's, Tune's, Train's and Ray Data's, run on), then with everything stopped. The trial over
the loop beside Ray (`in_trial_vs_beside_ray_img_s`) says what the trial's own loop costs; the
loop beside Ray over the loop alone (`beside_ray_vs_bench_img_s`), what Ray's other processes
cost it. The first times the second is about the headline ratio.
The last line printed is a JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from raysweep.errors import RaysweepError, cli_entry
# The process title Ray gives Train's worker actor (Ray's own name for the class).
TRAIN_WORKER = b"ray::RayTrainWorker"

GOALS = {"median_epoch_overhead_s": 0.1, "time_to_first_step_s": 8.0, "in_trial_vs_bench_img_s": 0.9}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m raysweep.bench overhead", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    # 100 (a real trial's 90, about): the largest trial trains long enough for ~12 pauses, and
    # the ratio is their median. At 60 it had 6-7; in one run their ratios rose through the
    # trial (0.87-0.91 over the first three, 0.94-0.99 over the last three).
    p.add_argument("--epochs", type=int, default=100, help="epochs per trial (default: 100)")
    p.add_argument("--fractions", type=float, nargs="+", default=[1.0, 0.5, 0.25],
                   help="training fractions, one trial each, largest first (default: 1 0.5 0.25)")
    p.add_argument("--train-per-class", type=int, default=40,
                   help="synthetic training images per class, 10 classes (default: 40)")
    p.add_argument("--image-size", type=int, default=64, help="input side in pixels (default: 64)")
    p.add_argument("--width", type=float, default=0.25, help="AlexNet width multiplier (default: 0.25)")
    p.add_argument("--batch-size", type=int, default=32, help="training batch (default: 32)")
    p.add_argument("--checkpoint-every", type=int, default=8, help="epochs between checkpoints (default: 8)")
    p.add_argument("--pause-every", type=float, default=2.0,
                   help="seconds of the trial's training between pauses for the loop outside Ray (default: 2)")
    p.add_argument("--pause-epochs", type=int, default=2,
                   help="epochs of the loop outside Ray in each half of a pause (beside Ray's other "
                        "processes, then alone) (default: 2)")
    p.add_argument("--work-dir", type=Path, default=None,
                   help="where the sweep and its cache go (default: a temporary directory, removed after)")
    p.add_argument("--address", default=None, help="join this Ray cluster instead of starting one")
    return p


def _config(a, work: Path) -> Path:
    cfg = {"name": "bench-overhead", "description": "raysweep.bench overhead: a fast sweep",
           "data": {"source": "synthetic", "cache_dir": str(work / "cache"), "image_size": a.image_size,
                    "synthetic_classes": 10, "synthetic_train_per_class": a.train_per_class,
                    "synthetic_val_per_class": 10, "synthetic_test_per_class": 10},
           "model": {"name": "alexnet", "width": a.width},
           "train": {"epochs": a.epochs, "batch_size": a.batch_size, "eval_batch_size": 128,
                     "optimizer": "adamw", "lr": 1e-3, "schedule": "constant", "patience": 0},
           # One trial at a time with every core: its start-up is measured alone, and the loop
           # outside Ray gets the same threads.
           "sweep": {"fractions": a.fractions, "seeds": [0], "gpus_per_trial": 0, "cpus_per_trial": os.cpu_count() or 1,
                     "checkpoint_every": a.checkpoint_every, "storage_path": str(work / "results")}}
    import yaml

    path = work / "bench-overhead.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


class OutsideRay:
    """The trial's loop on the trial's images, in this process: the trial's subset of the
    sweep's cache (nothing decoded), its model, optimizer and threads."""

    def __init__(self, cfg_path: Path, fraction: float, threads: int):
        import torch

        from raysweep.config import load_config
        from raysweep.data import prepare_from_config, stratified_subset
        from raysweep.trial.device_data import DeviceSplit
        from raysweep.trial.runner import Runner, epochs_for_budget

        cfg = load_config(cfg_path)
        prepared = prepare_from_config(cfg.data, progress=False)
        idx = stratified_subset(prepared.labels("train"), fraction, 0)
        self.split = DeviceSplit(torch.from_numpy(prepared.images("train")[idx]),
                                 torch.from_numpy(prepared.labels("train")[idx]))
        torch.set_num_threads(threads)
        n_epochs = epochs_for_budget(cfg.train, len(idx), len(prepared.labels("train")))
        self.runner = Runner(cfg.train, prepared.num_classes, 0, torch.device("cpu"),
                             n_epochs * -(-len(idx) // cfg.train.batch_size), model=(cfg.model.name, cfg.model.width))

    def epochs(self, n: int) -> list[float]:
        """img/s of each of `n` training epochs."""
        return [self.runner.train_epoch(self.split)["images_per_sec"] for _ in range(n)]


@contextlib.contextmanager
def paused(root_pid: int, only=None):
    """Stop (SIGSTOP) the process `root_pid` and every process under it (those of them for which
    `only(psutil.Process)` is true, if given), and resume them on leaving, whatever happens
    inside. Yields how many were stopped."""
    import ray  # noqa: F401  (puts Ray's bundled psutil on the path)
    import psutil

    stopped = []
    try:
        root = psutil.Process(root_pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        procs = []
    try:
        for proc in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                if only is not None and not only(proc):
                    continue
                proc.suspend()
                stopped.append(proc)
        yield len(stopped)
    finally:
        for proc in stopped:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.resume()


def _reported_epoch(runs: Path, fresh_s: float = 2.0) -> int | None:
    """The last epoch a trial training now has handed to Train (its worker's ledger, written
    within `fresh_s`), or None when no trial is training."""
    from raysweep.trial.loop import LEDGER_FILE

    newest = None
    for path in runs.glob(f"*/{LEDGER_FILE}"):
        with contextlib.suppress(OSError):
            mtime = path.stat().st_mtime
            if newest is None or mtime > newest[0]:
                newest = (mtime, path)
    if newest is None or time.time() - newest[0] > fresh_s:
        return None
    try:
        return int(json.loads(newest[1].read_text())["epoch"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def is_train_worker(proc) -> bool:
    """Whether a psutil.Process is a trial's Ray Train worker (by the title Ray gives it)."""
    try:
        return (proc.cmdline() or [""])[0].startswith(CpuWatch.WORKER)
    except Exception:  # gone, or not ours to read
        return False


Pause = tuple[float, float, list[float]]  # (start, end, img/s of the loop's epochs in it)


def interleave(sweep: subprocess.Popen, runs: Path, reference: OutsideRay, epochs: int, every_s: float,
               per_pause: int, cpu: "CpuWatch | None" = None) -> tuple[list[Pause], list[Pause]]:
    """Until the sweep ends: whenever a trial is training (past its 2nd epoch, and not near its
    last), pause it every `every_s` seconds for 2 x `per_pause` epochs of the loop here: first
    with only the trial's worker stopped (the loop beside Ray's other processes), then with the
    whole sweep stopped (the loop alone). Returns each pause's loop alone and loop beside Ray, as
    (start, end, img/s of its epochs), both spanning the whole pause. `cpu` closes an interval
    either side of each pause."""
    alone, beside, due = [], [], None
    while sweep.poll() is None:
        time.sleep(0.2)
        epoch = _reported_epoch(runs)
        if epoch is None or not 2 <= epoch <= epochs - 4:
            due = None
            continue
        if due is None:
            due = time.time() + every_s
        elif time.time() >= due:
            if cpu is not None:
                cpu.sample_now()
            start = time.time()
            with paused(sweep.pid, only=is_train_worker) as n:
                next_to_ray = reference.epochs(per_pause) if n else []
            with paused(sweep.pid):
                by_itself = reference.epochs(per_pause)
            end = time.time()
            if cpu is not None:
                cpu.sample_now()
            alone.append((start, end, by_itself))
            beside.append((start, end, next_to_ray))
            due = time.time() + every_s
    return alone, beside


def _clean_epochs(rows: list[dict], pauses: list[Pause],
                  settle_s: float) -> list[tuple[float, float, float]]:
    """(start, end, img/s) of the trial's training passes from epoch 2 on that overlap no pause,
    nor start within `settle_s` after one (while Ray catches up)."""
    return [(r["trained_at"] - r["time_train_s"], r["trained_at"], r["images_per_sec"]) for r in rows[1:]
            if "trained_at" in r
            and not any(r["trained_at"] - r["time_train_s"] < end + settle_s and r["trained_at"] > start
                        for start, end, _ in pauses)]


def clear_of_pauses(rows: list[dict], pauses: list[Pause]) -> list[dict]:
    """The epochs (rows) whose wall time cannot include a pause. A pause stops the whole sweep, so
    an epoch that held one took longer by its length. An epoch's wall time lies within one wall
    time either side of the end of its training pass (`trained_at`); an epoch is kept if no
    pause overlaps that span."""
    def clear(r: dict) -> bool:
        if "trained_at" not in r:
            return True
        t, span = r["trained_at"], r["time_epoch_s"]
        return not any(t - span < end and t + span > start for start, end, _ in pauses)

    return [r for r in rows if clear(r)]


def split_by_pauses(rows: list[dict], pauses: list[Pause],
                    settle_s: float = 0.5) -> tuple[list[float], list[float]]:
    """The trial's training img/s (epochs 2.. whose training pass overlaps no pause, nor starts
    within `settle_s` after one, while Ray catches up) and the outside loop's (the pauses within
    the trial's training)."""
    if not any("trained_at" in r for r in rows[1:]):
        return [], []
    first, last = _training_span(rows)
    inside = [rate for _, _, rate in _clean_epochs(rows, pauses, settle_s)]
    outside = [rate for start, end, rates in pauses if first <= start and end <= last for rate in rates]
    return inside, outside


def paired_ratios(rows: list[dict], pauses: list[Pause],
                  settle_s: float = 0.5) -> list[float]:
    """One ratio per pause within the trial's training: the median img/s of the trial's clean
    epochs between the pauses either side of it, over the median of the pause's own loop epochs.
    Both sides of each ratio ran within a few seconds of each other, so a drift of the machine's
    speed over tens of seconds cancels in it, where it does not between two pooled medians."""
    clean = _clean_epochs(rows, pauses, settle_s)
    if not clean:
        return []
    first, last = min(c[0] for c in clean), max(c[1] for c in clean)
    inner = sorted(p for p in pauses if first <= p[0] and p[1] <= last)
    ratios = []
    for i, (start, end, rates) in enumerate(inner):
        lo = inner[i - 1][1] if i else float("-inf")
        hi = inner[i + 1][0] if i + 1 < len(inner) else float("inf")
        near = [rate for a, b, rate in clean if a >= lo and b <= hi]
        if len(near) >= 2 and rates:
            ratios.append(statistics.median(near) / statistics.median(rates))
    return ratios


def beside_over_alone(rows: list[dict], alone: list[Pause], beside: list[Pause]) -> list[float]:
    """Pause by pause, within the trial's training: the loop's median img/s beside Ray's other
    processes over its median alone, in the same pause."""
    first, last = _training_span(rows)
    return [statistics.median(b[2]) / statistics.median(a[2]) for a, b in zip(alone, beside)
            if a[2] and b[2] and first <= a[0] and a[1] <= last]


class CpuWatch:
    """Where the CPU went while a trial trained: samples every process's CPU time (psutil, which
    Ray ships) and, over the intervals in which Train's worker was busy, splits it between that
    worker and everything else, by process name. `summary(spans)` keeps the intervals that lie
    within the given (start, end) spans: the trials' training passes, past the start-up of the
    trial's helper processes, which would otherwise count while the worker loads its data."""

    WORKER = TRAIN_WORKER.decode()  # the process title Ray gives Train's worker

    def __init__(self, interval: float = 1.0, exclude: set[int] | None = None):
        import threading

        self.interval, self.exclude = interval, set(exclude or ())
        self.intervals: list[tuple[float, float, float, dict[str, float]]] = []  # (start, end, worker_s, others)
        self._stop, self._lock = threading.Event(), threading.Lock()
        self._last: dict[int, tuple[str, float]] | None = None
        self._t_last = 0.0
        self._thread = threading.Thread(target=self._run, name="raysweep-cpuwatch", daemon=True)

    @staticmethod
    def _sample() -> dict[int, tuple[str, float]]:
        import ray  # noqa: F401  (puts Ray's bundled psutil on the path)
        import psutil

        out = {}
        for proc in psutil.process_iter(["name", "cmdline", "cpu_times"]):
            cmd, times = proc.info["cmdline"] or [], proc.info["cpu_times"]
            if times is None:
                continue
            first = cmd[0] if cmd else proc.info["name"] or "?"
            name = first.split(".")[0] if first.startswith("ray::") else first.rsplit("/", 1)[-1]
            out[proc.pid] = (name, times.user + times.system)
        return out

    def sample_now(self) -> None:
        """Close the current interval here (the bench does so either side of a pause, so that no
        interval mixes a pause with training)."""
        with self._lock:
            now = {pid: v for pid, v in self._sample().items() if pid not in self.exclude}
            t_now = time.time()
            if self._last is not None:
                self.add(self._last, now, self._t_last, t_now)
            self._last, self._t_last = now, t_now

    def _run(self) -> None:
        self.sample_now()
        while not self._stop.wait(self.interval):
            self.sample_now()

    def add(self, before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]],
            start: float, end: float) -> None:
        """Account the interval [start, end] between two samples (pid -> (name, CPU seconds)); a
        process that started within it counts from zero. Skipped unless the worker was training."""
        delta = {pid: (name, t - before.get(pid, (name, 0.0))[1]) for pid, (name, t) in after.items()}
        worker = sum(d for name, d in delta.values() if name.startswith(self.WORKER))
        if worker < 0.5 * (end - start):  # not training: start-up, between trials
            return
        others = Counter()
        for name, d in delta.values():
            if not name.startswith(self.WORKER) and d > 0:
                others[name] += d
        self.intervals.append((start, end, worker, dict(others)))

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def summary(self, spans: list[tuple[float, float]] | None = None) -> dict | None:
        """Shares of the CPU over the busy intervals (those within one of `spans`, if given)."""
        kept = [iv for iv in self.intervals
                if spans is None or any(lo <= iv[0] and iv[1] <= hi for lo, hi in spans)]
        worker_s, others = sum(iv[2] for iv in kept), Counter()
        for iv in kept:
            others.update(iv[3])
        total = worker_s + sum(others.values())
        if total <= 0:
            return None
        top = others.most_common(5)
        return {"worker_share": round(worker_s / total, 3),
                "others_share": round(1 - worker_s / total, 3),
                "top_others": {name: round(t / total, 3) for name, t in top}}


def _training_span(rows: list[dict]) -> tuple[float, float]:
    """When a trial's training passes (epochs 2..) began and ended."""
    trained = [r for r in rows[1:] if "trained_at" in r]
    if not trained:
        return 0.0, 0.0
    return min(r["trained_at"] - r["time_train_s"] for r in trained), max(r["trained_at"] for r in trained)


def _median_or_none(xs: list[float]) -> float | None:
    return round(statistics.median(xs), 3) if xs else None


def _quartiles_or_none(xs: list[float]) -> list[float] | None:
    if len(xs) < 2:
        return None
    q = statistics.quantiles(xs, n=4)
    return [round(q[0], 3), round(q[2], 3)]


def _trial_rows(exp: Path) -> list[list[dict]]:
    trials = []
    for result in sorted(exp.glob("*/result.json")):
        rows = [json.loads(line) for line in result.read_text().splitlines() if line.strip()]
        if rows:
            trials.append(rows)
    if not trials:
        raise RaysweepError(f"the benchmark sweep in {exp} left no trial results")
    return trials


@cli_entry
def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    if a.epochs < 8 or a.checkpoint_every < 2:
        raise RaysweepError("--epochs must be >= 8 and --checkpoint-every >= 2 (epochs without a checkpoint "
                            "are what the overhead is measured on)")
    if a.pause_every <= 0 or a.pause_epochs < 1:
        raise RaysweepError("--pause-every must be > 0 and --pause-epochs >= 1")
    with tempfile.TemporaryDirectory(prefix="rs-bench-overhead-") as tmp:
        work = (a.work_dir or Path(tmp)).expanduser().resolve()
        work.mkdir(parents=True, exist_ok=True)
        cfg_path = _config(a, work)
        from raysweep.config import load_config
        from raysweep.sweep.ray_compat import quiet_ray_logs
        from raysweep.data import prepare_from_config
        from raysweep.sweep.cli import TRAIN_RUNS

        quiet_ray_logs()
        import ray

        prepare_from_config(load_config(cfg_path).data, progress=False)  # decoded once, for both sides
        ray.shutdown()  # the sweep starts its own Ray, as a user's would
        threads = os.cpu_count() or 1
        reference = OutsideRay(cfg_path, a.fractions[0], threads)
        print(f"outside Ray: the trial loop on fraction {a.fractions[0]:g}, {threads} torch thread(s); "
              f"warming up ...", flush=True)
        warm = reference.epochs(3)
        cmd = [sys.executable, "-m", "raysweep.tune", "--config", str(cfg_path), "--name", "sweep", "--quiet"]
        interleaved = not a.address
        if interleaved:
            print(f"the sweep runs; every {a.pause_every:g} s of a trial's training it is paused for "
                  f"{a.pause_epochs} epoch(s) of the loop here beside Ray's other processes (only the trial's "
                  f"worker stopped), then {a.pause_epochs} with the whole sweep stopped", flush=True)
        else:  # a cluster that is not ours is not paused: the loop runs before and after the sweep
            cmd += ["--address", a.address]
            before = reference.epochs(a.epochs)
        t0 = time.time()
        with CpuWatch(interval=2.0, exclude={os.getpid()}) as cpu:
            sweep = subprocess.Popen(cmd)
            try:
                pauses, beside = interleave(sweep, work / "results" / "sweep" / TRAIN_RUNS, reference, a.epochs,
                                            a.pause_every, a.pause_epochs, cpu) if interleaved else ([], [])
                rc = sweep.wait()
            finally:
                if sweep.poll() is None:
                    sweep.terminate()
                    sweep.wait()
        sweep_s = time.time() - t0
        if rc != 0:
            raise RaysweepError(f"the benchmark sweep failed (exit {rc}); see {work / 'results' / 'sweep'}")
        if not interleaved:
            pauses = [(0.0, 0.0, before + reference.epochs(a.epochs))]
        trials = _trial_rows(work / "results" / "sweep")

    # The overhead: epochs without a checkpoint, nor a pause of the bench's own in them.
    plain = [r for rows in trials for r in clear_of_pauses(rows, pauses) if not r.get("checkpointed")]
    saved = [r for rows in trials for r in rows if r.get("checkpointed")]
    overhead = [r["time_epoch_s"] - r["time_train_s"] - r["time_eval_s"] for r in plain]
    first = sorted(rows[0]["time_to_first_step_s"] for rows in trials)
    largest = max(trials, key=lambda rows: rows[0]["n_train"])
    if interleaved:
        inside, outside = split_by_pauses(largest, pauses)
        pairs = paired_ratios(largest, pauses)
        beside_pairs = paired_ratios(largest, beside)
        ray_costs = beside_over_alone(largest, pauses, beside)
    else:
        inside, outside, pairs = [r["images_per_sec"] for r in largest[1:]], pauses[0][2], []
        beside_pairs, ray_costs = [], []
    if len(inside) < 3 or len(outside) < 3 or (interleaved and len(pairs) < 3):
        raise RaysweepError(f"too few epochs to compare ({len(inside)} in the trial, {len(outside)} outside "
                            f"Ray, {len(pairs)} pauses with trial epochs either side): raise --epochs or "
                            "lower --pause-every")
    in_trial, reference_s = statistics.median(inside), statistics.median(outside)
    pooled = in_trial / reference_s
    ratio = statistics.median(pairs) if pairs else pooled
    quartiles = _quartiles_or_none(pairs) or [round(ratio, 3)] * 2
    out = {
        "median_epoch_overhead_s": round(statistics.median(overhead), 4),
        "max_epoch_overhead_s": round(max(overhead), 4),
        "checkpoint_s": round(statistics.median(r["time_checkpoint_s"] for r in saved), 4),
        "time_to_first_step_s": round(statistics.median(first), 2),
        "time_to_first_step_s_first_trial": round(trials[0][0]["time_to_first_step_s"], 2),
        "time_to_first_step_s_each": [round(rows[0]["time_to_first_step_s"], 2) for rows in trials],
        "startup_parts_s": {k: round(statistics.median(rows[0][k] for rows in trials), 2)
                            for k in ("time_setup_s", "time_launch_s", "time_data_load_s")},
        "median_report_s": round(statistics.median(r["time_report_s"] for rows in trials for r in rows[1:]), 4),
        # Interleaved: the median over pauses of (the trial's img/s around the pause) / (the loop's
        # in it). Pooled: the median of all the trial's epochs over that of all the loop's.
        "in_trial_vs_bench_img_s": round(ratio, 3),
        "in_trial_vs_bench_img_s_quartiles": quartiles,
        "in_trial_vs_bench_img_s_pooled": round(pooled, 3), "paired_pauses": len(pairs),
        "in_trial_vs_bench_img_s_each": [round(r, 3) for r in pairs],  # pause by pause, in order
        # Why: the trial over the same loop beside Ray's other processes (only the trial's worker
        # stopped), and that loop over the loop alone; their product is about the ratio above.
        "in_trial_vs_beside_ray_img_s": _median_or_none(beside_pairs),
        "in_trial_vs_beside_ray_img_s_quartiles": _quartiles_or_none(beside_pairs),
        "beside_ray_vs_bench_img_s": _median_or_none(ray_costs),
        "beside_ray_vs_bench_img_s_quartiles": _quartiles_or_none(ray_costs),
        "in_trial_img_s": round(in_trial, 1), "bench_img_s": round(reference_s, 1),
        "bench_img_s_warm_up": round(statistics.median(warm), 1), "interleaved": interleaved,
        "pauses": len(pauses) if interleaved else 0, "in_trial_epochs": len(inside), "bench_epochs": len(outside),
        "trials": len(trials), "epochs_measured": len(plain), "sweep_wall_s": round(sweep_s, 1),
        "cpus": os.cpu_count(), "load_average_1m": round(os.getloadavg()[0], 2),
        # While the trial trained: Train's worker's share of the CPU time spent, and the rest's.
        "cpu_while_training": cpu.summary([_training_span(rows) for rows in trials]),
    }
    out["goals_met"] = {k: (out[k] <= v if k != "in_trial_vs_bench_img_s" else out[k] >= v) for k, v in GOALS.items()}
    print(f"per-epoch overhead (epoch wall - train - eval, {len(plain)} epochs without a checkpoint or a pause): "
          f"median {out['median_epoch_overhead_s'] * 1000:.1f} ms, max {out['max_epoch_overhead_s'] * 1000:.1f} ms "
          f"(goal <= {GOALS['median_epoch_overhead_s'] * 1000:.0f} ms)")
    print(f"checkpoint: median {out['checkpoint_s'] * 1000:.1f} ms over {len(saved)} checkpoints")
    print(f"time to first optimizer step: median {out['time_to_first_step_s']:.2f} s over {len(trials)} trials "
          f"(goal <= {GOALS['time_to_first_step_s']:g} s; each: "
          + ", ".join(f"{t:.2f}" for t in out["time_to_first_step_s_each"]) + " s); median parts: "
          + ", ".join(f"{k[5:-2]} {v:.2f} s" for k, v in out["startup_parts_s"].items()))
    how = (f"interleaved over {out['pauses']} pauses" if interleaved else "the loop before and after the sweep")
    print(f"training img/s: in the trial {in_trial:.1f} (median of {len(inside)} epochs), same loop outside "
          f"Ray {reference_s:.1f} (median of {len(outside)} epochs, {how}): pooled ratio {pooled:.3f}")
    if not pairs:
        print(f"  (goal >= {GOALS['in_trial_vs_bench_img_s']:g})")
    else:
        print(f"  paired, pause by pause: median ratio {ratio:.3f} over {len(pairs)} pauses (quartiles "
              f"{quartiles[0]:.3f}-{quartiles[1]:.3f}) (goal >= {GOALS['in_trial_vs_bench_img_s']:g})")
    if out["in_trial_vs_beside_ray_img_s"] is not None and out["beside_ray_vs_bench_img_s"] is not None:
        own, others = out["in_trial_vs_beside_ray_img_s"], out["beside_ray_vs_bench_img_s"]
        print(f"  why, pause by pause: the trial over the same loop beside Ray's other processes (only the "
              f"trial's worker paused) {own:.3f}; that loop over the loop alone {others:.3f} "
              f"({1 - others:.0%} lost to Ray's other processes)")
    if out["cpu_while_training"]:
        c = out["cpu_while_training"]
        print(f"CPU while the trial trained: Train's worker {c['worker_share']:.0%}, other processes "
              f"{c['others_share']:.0%} (" + ", ".join(f"{k} {v:.1%}" for k, v in c["top_others"].items()) + ")")
        if c["others_share"] > 0.05 and not out["goals_met"]["in_trial_vs_bench_img_s"]:
            print("  a loop with as many threads as cores slows by more than the CPU it loses: each step "
                  "waits for its slowest thread. With spare cores (a GPU machine) this does not apply.")
    print(json.dumps(out))
    return 0
