"""`python -m raysweep.bench overhead`: what Ray costs around each epoch and each trial, measured
through a real sweep (`python -m raysweep.tune`: Tune trials that fit Train TorchTrainers).

The sweep runs a fast configuration (small images, a narrow AlexNet, small subsets, 20+ epochs)
so that the machinery around the epochs is visible. Its trials' own metrics give the overhead
(epoch wall time minus training and evaluation, on epochs without a checkpoint), the checkpoint
cost and the time to the first optimizer step. The same training loop then runs on the same
images outside Ray, with the trial's threads, before and after the sweep: the trial's img/s over
that is `in_trial_vs_bench_img_s`. The last line printed is a JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from raysweep.errors import RaysweepError, cli_entry

GOALS = {"median_epoch_overhead_s": 0.1, "time_to_first_step_s": 8.0, "in_trial_vs_bench_img_s": 0.9}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m raysweep.bench overhead", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=24, help="epochs per trial (default: 24)")
    p.add_argument("--fractions", type=float, nargs="+", default=[1.0, 0.5],
                   help="training fractions, one trial each (default: 1 0.5)")
    p.add_argument("--train-per-class", type=int, default=40,
                   help="synthetic training images per class, 10 classes (default: 40)")
    p.add_argument("--image-size", type=int, default=64, help="input side in pixels (default: 64)")
    p.add_argument("--width", type=float, default=0.25, help="AlexNet width multiplier (default: 0.25)")
    p.add_argument("--batch-size", type=int, default=32, help="training batch (default: 32)")
    p.add_argument("--checkpoint-every", type=int, default=8, help="epochs between checkpoints (default: 8)")
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


def _outside_ray(cfg_path: Path, fraction: float, epochs: int, threads: int) -> float:
    """The trial's loop on the trial's images, in this process: median img/s of epochs 2..N."""
    import torch

    from raysweep.config import load_config
    from raysweep.data import prepare_from_config, stratified_subset
    from raysweep.device_data import DeviceSplit
    from raysweep.runner import Runner, epochs_for_budget

    cfg = load_config(cfg_path)
    prepared = prepare_from_config(cfg.data, progress=False)  # the sweep's cache: nothing decoded
    idx = stratified_subset(prepared.labels("train"), fraction, 0)
    split = DeviceSplit(torch.from_numpy(prepared.images("train")[idx]), torch.from_numpy(prepared.labels("train")[idx]))
    torch.set_num_threads(threads)
    n_epochs = epochs_for_budget(cfg.train, len(idx), len(prepared.labels("train")))
    runner = Runner(cfg.train, prepared.num_classes, 0, torch.device("cpu"),
                    n_epochs * -(-len(idx) // cfg.train.batch_size), model=(cfg.model.name, cfg.model.width))
    rates = [runner.train_epoch(split)["images_per_sec"] for _ in range(epochs)]
    return statistics.median(rates[1:])


class CpuWatch:
    """Where the CPU went while a trial trained: samples every process's CPU time (psutil, which
    Ray ships) and, over the intervals in which Train's worker was busy, splits it between that
    worker and everything else, by process name."""

    WORKER = "ray::RayTrainWorker"

    def __init__(self, interval: float = 1.0):
        import threading

        self.interval, self.worker_s, self.others = interval, 0.0, {}
        self._stop = threading.Event()
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

    def _run(self) -> None:
        last = self._sample()
        while not self._stop.wait(self.interval):
            now = self._sample()
            self.add(last, now, self.interval)
            last = now

    def add(self, before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]], seconds: float) -> None:
        """Account one interval between two samples (pid -> (name, CPU seconds)); a process
        that started within it counts from zero. Skipped unless the worker was training."""
        delta = {pid: (name, t - before.get(pid, (name, 0.0))[1]) for pid, (name, t) in after.items()}
        worker = sum(d for name, d in delta.values() if name.startswith(self.WORKER))
        if worker < 0.5 * seconds:  # not training: start-up, between trials
            return
        self.worker_s += worker
        for name, d in delta.values():
            if not name.startswith(self.WORKER) and d > 0:
                self.others[name] = self.others.get(name, 0.0) + d

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def summary(self) -> dict | None:
        total = self.worker_s + sum(self.others.values())
        if total <= 0:
            return None
        top = sorted(self.others.items(), key=lambda kv: -kv[1])[:5]
        return {"worker_share": round(self.worker_s / total, 3),
                "others_share": round(1 - self.worker_s / total, 3),
                "top_others": {name: round(t / total, 3) for name, t in top}}


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
    if a.epochs < 3 or a.checkpoint_every < 2:
        raise RaysweepError("--epochs must be >= 3 and --checkpoint-every >= 2 (epochs without a checkpoint "
                            "are what the overhead is measured on)")
    with tempfile.TemporaryDirectory(prefix="rs-bench-overhead-") as tmp:
        work = (a.work_dir or Path(tmp)).expanduser().resolve()
        work.mkdir(parents=True, exist_ok=True)
        cfg_path = _config(a, work)
        from raysweep import tune

        # Decode the cache first, so the outside-Ray reference can run before the sweep too.
        from raysweep.config import load_config
        from raysweep.console import quiet_ray_logs
        from raysweep.data import prepare_from_config

        quiet_ray_logs()
        import ray

        prepare_from_config(load_config(cfg_path).data, progress=False)
        ray.shutdown()  # the sweep starts its own Ray, as a user's would
        threads = os.cpu_count() or 1
        print(f"outside Ray, before the sweep: the trial loop on fraction {a.fractions[0]:g}, "
              f"{threads} torch thread(s) ...", flush=True)
        before = _outside_ray(cfg_path, a.fractions[0], a.epochs, threads)
        t0 = time.time()
        args = ["--config", str(cfg_path), "--name", "sweep", "--quiet"] + (["--address", a.address] if a.address else [])
        with CpuWatch() as cpu:
            rc = tune.main(args)
        sweep_s = time.time() - t0
        if rc != 0:
            raise RaysweepError(f"the benchmark sweep failed (exit {rc}); see {work / 'results' / 'sweep'}")
        ray.shutdown()
        after = _outside_ray(cfg_path, a.fractions[0], a.epochs, threads)
        trials = _trial_rows(work / "results" / "sweep")

    plain = [r for rows in trials for r in rows if not r.get("checkpointed")]
    saved = [r for rows in trials for r in rows if r.get("checkpointed")]
    overhead = [r["time_epoch_s"] - r["time_train_s"] - r["time_eval_s"] for r in plain]
    first = sorted(rows[0]["time_to_first_step_s"] for rows in trials)
    largest = max(trials, key=lambda rows: rows[0]["n_train"])
    in_trial = statistics.median(r["images_per_sec"] for r in largest[1:])
    reference = (before + after) / 2
    out = {
        "median_epoch_overhead_s": round(statistics.median(overhead), 4),
        "max_epoch_overhead_s": round(max(overhead), 4),
        "checkpoint_s": round(statistics.median(r["time_checkpoint_s"] for r in saved), 4),
        "time_to_first_step_s": round(statistics.median(first), 2),
        "time_to_first_step_s_first_trial": round(trials[0][0]["time_to_first_step_s"], 2),
        "startup_parts_s": {k: round(statistics.median(rows[0][k] for rows in trials), 2)
                            for k in ("time_setup_s", "time_launch_s", "time_data_load_s")},
        "median_report_s": round(statistics.median(r["time_report_s"] for rows in trials for r in rows[1:]), 4),
        "in_trial_vs_bench_img_s": round(in_trial / reference, 3),
        "in_trial_img_s": round(in_trial, 1), "bench_img_s_before": round(before, 1),
        "bench_img_s_after": round(after, 1), "trials": len(trials),
        "epochs_measured": len(plain), "sweep_wall_s": round(sweep_s, 1), "cpus": os.cpu_count(),
        "load_average_1m": round(os.getloadavg()[0], 2),
        # While the trial trained: Train's worker's share of the CPU time spent, and the rest's.
        "cpu_while_training": cpu.summary(),
    }
    out["goals_met"] = {k: (out[k] <= v if k != "in_trial_vs_bench_img_s" else out[k] >= v) for k, v in GOALS.items()}
    print(f"per-epoch overhead (epoch wall - train - eval, {len(plain)} epochs without a checkpoint): "
          f"median {out['median_epoch_overhead_s'] * 1000:.1f} ms, max {out['max_epoch_overhead_s'] * 1000:.1f} ms "
          f"(goal <= {GOALS['median_epoch_overhead_s'] * 1000:.0f} ms)")
    print(f"checkpoint: median {out['checkpoint_s'] * 1000:.1f} ms over {len(saved)} checkpoints")
    print(f"time to first optimizer step: median {out['time_to_first_step_s']:.2f} s over {len(trials)} trials "
          f"(goal <= {GOALS['time_to_first_step_s']:g} s); parts: " +
          ", ".join(f"{k[5:-2]} {v:.2f} s" for k, v in out["startup_parts_s"].items()))
    print(f"training img/s: in the trial {in_trial:.1f}, same loop outside Ray {before:.1f} (before) / "
          f"{after:.1f} (after): ratio {out['in_trial_vs_bench_img_s']:.3f} "
          f"(goal >= {GOALS['in_trial_vs_bench_img_s']:g})")
    if out["cpu_while_training"]:
        c = out["cpu_while_training"]
        print(f"CPU while the trial trained: Train's worker {c['worker_share']:.0%}, other processes "
              f"{c['others_share']:.0%} (" + ", ".join(f"{k} {v:.1%}" for k, v in c["top_others"].items()) + ")")
        if c["others_share"] > 0.05 and not out["goals_met"]["in_trial_vs_bench_img_s"]:
            print("  a loop with as many threads as cores slows by more than the CPU it loses: each step "
                  "waits for its slowest thread. With spare cores (a GPU machine) this does not apply.")
    print(json.dumps(out))
    return 0
