"""One trial's worker loop (`train_loop_per_worker`), run by Ray Train on each of its workers.

Each epoch trains, evaluates, decides on early stopping and on a checkpoint, and reports once
with where its time went. Reports leave from a thread of their own (raysweep.reporting), so the
loop never waits for Train's controller to collect one. Checkpoints are written straight into
the Train run directory (no staging copy) and carry the metrics of every epoch so far: a
restarted worker replays them, so Tune's files end up with every epoch exactly once
(raysweep/trial_logs.py drops repeats).
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from raysweep.config import ModelConfig, TrainConfig
from raysweep.device_data import StreamSplit, load_split
from raysweep.metrics import clearly_below_chance, primary_k
from raysweep.model import describe, needs_torchvision
from raysweep.reporting import Reporter
from raysweep.runner import BestWeights, Runner, epochs_for_budget
from raysweep.warm import import_in_thread

STATE_FILE = "state.pt"  # model, optimizer, scheduler, RNG states, epoch, best-so-far
BEST_FILE = "best_model.pt"  # the best-validation weights (the final checkpoint holds only these)
HISTORY_FILE = "history.json"  # every reported epoch so far, replayed after a restart
LEDGER_FILE = "ledger.json"  # in the run directory: wall time of the last report, and whose it was
CHECKPOINT_SHARE = 0.02  # automatic cadence: checkpoints take at most this share of the time
# Epochs go to Train at most this often (a checkpoint, and the last epoch, go at once): shorter
# epochs travel together. Each report wakes Train's controller and Tune's driver; on a 2-core
# machine their share of the CPU came out of the training threads.
REPORT_EVERY_S = 1.0
# Sustained write speed assumed before a checkpoint has been timed (a cautious local disk).
ASSUMED_WRITE_BYTES_S = 500e6
# Host memory a CPU trial may fill with its data: the rest streams.
HOST_DATA_SHARE = 0.5


class InjectedFailure(RuntimeError):
    """Raised by `train.fail_at_epoch` to exercise resume."""


def load_best_weights(checkpoint_dir: str | Path, state: dict | None = None) -> dict[str, torch.Tensor]:
    """The best-validation weights recorded in one of this loop's checkpoint directories: their
    own file, or else the checkpoint's model (`state`: its state file, if already read)."""
    d = Path(checkpoint_dir)
    if (d / BEST_FILE).exists():
        return torch.load(d / BEST_FILE, map_location="cpu", weights_only=True)
    if state is None:
        state = torch.load(d / STATE_FILE, map_location="cpu", weights_only=True)
    return state["model"]


def _rank_key(m: dict[str, float], metric: str) -> tuple[float, ...]:
    # The select metric decides; ties (common on small sets) go to top-1, then loss. A NaN
    # (diverged) epoch is never the best.
    return tuple(math.inf if math.isnan(v) else v for v in (m[metric], m["val_top1_error"], m["val_loss"]))


def _write_ledger(run_dir: Path, row: dict) -> None:
    """Atomically replace the small ledger file (no fsync: it only needs to survive a process)."""
    tmp = run_dir / f".{LEDGER_FILE}.{os.getpid()}"
    tmp.write_text(json.dumps(row))
    os.replace(tmp, run_dir / LEDGER_FILE)


def _read_ledger(run_dir: Path) -> dict | None:
    try:
        return json.loads((run_dir / LEDGER_FILE).read_text())
    except (OSError, ValueError):
        return None


def _cpu_threads(tc: TrainConfig) -> int:
    # Ray sets OMP_NUM_THREADS=1 in workers; use what the trial was given instead.
    if tc.num_threads:
        return tc.num_threads
    import ray

    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU") or os.cpu_count() or 1
    return max(1, int(cpus))


def _load_data(config: dict, rank: int, world: int, device: torch.device, batch_size: int,
               eval_batch_size: int) -> dict:
    """This worker's splits, read through Ray Data on its own node (where the cache preflight
    checked the cache is): its shard of the subset, whole validation and test. Held on the
    device while they fit its memory budget (train first), streamed otherwise."""
    from raysweep.data import stratified_subset
    from raysweep.gpu import agree_on_residency, bytes_by_split, plan_device_residency

    prepared = config["prepared"]
    subset = stratified_subset(prepared.labels("train"), config["fraction"], config["seed"])
    # Equal shards, so every DDP rank takes the same number of steps (at most world-1 rows unused).
    indices = {"train": subset[rank::world][:len(subset) // world], "validation": None, "test": None}
    rows = {"train": len(indices["train"]), "validation": config["n_val"], "test": config["n_test"]}
    size = config["image_size"]
    if device.type == "cuda":
        resident = plan_device_residency(rows, size, device, config.get("gpu_share") or 1.0,
                                         reserve=config["reserve_bytes"], batch_size=batch_size,
                                         eval_batch_size=eval_batch_size)
    else:
        import psutil  # a Ray dependency

        room, resident = HOST_DATA_SHARE * psutil.virtual_memory().available, {}
        for name, need in bytes_by_split(rows, size).items():
            resident[name] = need <= room
            room -= need if resident[name] else 0
        resident = agree_on_residency(resident)
    splits = {}
    for name, n in rows.items():
        ds = prepared.dataset(name, indices=indices[name])
        splits[name] = load_split(ds, n, device) if resident[name] else StreamSplit(ds, n, device)
    return splits


def train_loop_per_worker(config: dict) -> None:
    t_enter = time.time()
    # First needed once the data has loaded, which mostly waits on Ray Data's tasks: overlap the
    # two (a no-op where the worker's setup hook, raysweep.warm, has imported them already).
    # torch._dynamo (1.6 s on a small CPU) is imported by the first optimizer built, whether or
    # not anything is compiled; torchvision (~1.5 s) by a torchvision model.
    models = ["torchvision.models"] if needs_torchvision(**config["model"]) else []
    imports = import_in_thread("torch._dynamo", *models)
    import ray.train
    import ray.train.torch
    from ray.train import CheckpointUploadMode

    # Ray Train logs every checkpoint at INFO; the sweep's display is the one progress view.
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    tc, mc = TrainConfig(**config["train"]), ModelConfig(**config["model"])
    seed, num_classes = int(config["seed"]), int(config["num_classes"])
    metric = config["select_metric"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    storage = ctx.get_storage()
    run_dir = Path(storage.experiment_fs_path)
    in_place = storage.storage_filesystem.type_name == "local"  # else: write locally, Ray uploads
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
    else:
        torch.set_num_threads(_cpu_threads(tc))

    # Wall time sums over attempts: a retry inside this Tune run starts where the last report
    # of the previous attempt left off; a new Tune run (resume) counts its start-up too.
    ledger = _read_ledger(run_dir) if rank == 0 else None
    same_run = bool(ledger) and ledger.get("token") == config["token"]
    wall_base = float(ledger["wall_time_s"]) if ledger else 0.0
    attempt_start = t_enter if same_run else float(config["trial_start"])

    def delivered(rows: list[dict]) -> None:  # in the reporter's thread, once Train has the rows
        _write_ledger(run_dir, {"token": config["token"], "epoch": rows[-1]["epoch"],
                                "wall_time_s": rows[-1]["wall_time_s"]})

    reporter = Reporter(ray.train.report, after=delivered if rank == 0 else None)
    # A trial that already ended (its final checkpoint holds only the best weights) only
    # reports its epochs again for this attempt's Tune files: no data to load, no model to build.
    checkpoint, state, history = ray.train.get_checkpoint(), None, []
    if checkpoint:
        with checkpoint.as_directory() as d:
            state = torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=True)
            history = json.loads((Path(d) / HISTORY_FILE).read_text())
        if state.get("final"):
            reporter.send(history)
            reporter.close()
            return

    t_data = time.time()
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False  # the sweep's display is the one view
    splits = _load_data(config, rank, world, device, tc.batch_size, tc.eval_batch_size)
    time_data_load_s = time.time() - t_data
    n_shard = len(splits["train"])
    imports.join()
    max_epochs = epochs_for_budget(tc, n_shard, max(n_shard, config["n_full"] // world))
    wrap = (lambda m: ray.train.torch.prepare_model(m, move_to_device=False)) if world > 1 else None
    runner = Runner(tc, num_classes, seed, device, max_epochs * math.ceil(n_shard / tc.batch_size), rank,
                    wrap, model=(mc.name, mc.width), precision=config.get("precision"))
    best_weights = BestWeights(runner.model)
    num_params = sum(p.numel() for p in runner.model.parameters())

    start, best_epoch, best = 1, 0, None
    drops, last_drop, best_step, drop_step = 0, 0, 0, 0
    if checkpoint:
        with checkpoint.as_directory() as d:
            best_weights.load(load_best_weights(d, state))
        runner.load_state_dict(state)
        start, best_epoch, best = state["epoch"] + 1, state["best_epoch"], state["best_metrics"]
        drops, last_drop = state.get("drops", 0), state.get("last_drop", 0)
        best_step, drop_step = state.get("best_step", 0), state.get("drop_step", 0)
        del state  # the optimizer state now lives in the runner
        # The Tune files of this attempt may lack these epochs; the trial logs drop any they have.
        if history:
            reporter.send(history)
    # Where this attempt's start-up went; a retry inside the same Tune run has no setup/launch.
    fit_start = float(config.get("fit_start") or attempt_start)
    startup = {"time_startup_s": t_data - attempt_start, "time_data_load_s": time_data_load_s,
               "time_setup_s": 0.0 if same_run else fit_start - attempt_start,
               "time_launch_s": 0.0 if same_run else t_enter - fit_start}

    patience_steps = math.ceil(config["n_full"] / world / tc.batch_size)  # one pass over the whole split
    every = int(config["checkpoint_every"])
    state_bytes = sum(t.numel() * t.element_size() for t in runner.model.state_dict().values())
    ckpt_cost = state_bytes * (3 if tc.optimizer == "adamw" else 2) / ASSUMED_WRITE_BYTES_S
    last_ckpt = mark = time.perf_counter()
    last_sent = -math.inf  # the first epoch goes at once
    report_s = 0.0
    pending: list[dict] = []  # epochs not handed to the reporter yet: it was still busy
    try:
        for epoch in range(start, max_epochs + 1):
            metrics = {"epoch": epoch, **runner.train_epoch(splits["train"], reduce=world > 1)}
            t_eval = time.perf_counter()
            metrics.update({f"val_{k}": v for k, v in runner.evaluate(splits["validation"]).items()})
            metrics["time_eval_s"] = time.perf_counter() - t_eval
            metrics["n_train"] = int(config["n_train"])
            improved = best is None or _rank_key(metrics, metric) < _rank_key(best, metric)
            if improved:
                best_step = runner.steps
                best_epoch, best = epoch, {k: metrics[k] for k in (metric, "val_top1_error", "val_top5_error", "val_loss")}
                best_weights.capture(runner.model)
            # A plateau: no new best of the select metric for `patience` epochs (since the last lr
            # drop too), nor for as many optimizer steps as `patience` passes over the whole split
            # take: a 1/16 subset's epoch is a handful of steps, too few to call it converged.
            # (The validation loss as a second signal kept tiny subsets going to their cap: with
            # two noisy signals, one of them improves by chance.) Under the plateau schedule a
            # plateau lowers the lr, `plateau_drops` times; otherwise, or after those, it ends it.
            stop = False
            if (tc.patience and epoch - max(best_epoch, last_drop) >= tc.patience
                    and runner.steps - max(best_step, drop_step) >= tc.patience * patience_steps):
                if tc.schedule == "plateau" and drops < tc.plateau_drops:
                    drops, last_drop, drop_step = drops + 1, epoch, runner.steps
                    runner.drop_lr(tc.step_gamma)
                else:
                    stop = True
            last = stop or epoch == max_epochs
            due = epoch % every == 0 if every > 0 else time.perf_counter() - last_ckpt >= ckpt_cost / CHECKPOINT_SHARE
            # Hand over now? The last report has been collected, and it went long enough ago.
            ready = reporter.idle() and time.perf_counter() - last_sent >= REPORT_EVERY_S
            if world > 1:  # rank 0 decides for every rank, or a collective (or report) would hang
                flags = torch.tensor([stop, last, due, ready], dtype=torch.int64,
                                     device=device if device.type == "cuda" else "cpu")
                torch.distributed.broadcast(flags, src=0)
                stop, last, due, ready = (bool(f) for f in flags.tolist())
            if last:
                t_test = time.perf_counter()
                metrics.update(_final_metrics(runner, splits["test"], best_weights, best_epoch, best, metric,
                                              num_classes, config["n_val"]))
                metrics.update({"stopped_early": bool(stop and epoch < max_epochs), "max_epochs": max_epochs,
                                "num_params": num_params, "model": describe(mc.name, mc.width)})
                metrics["time_test_s"] = time.perf_counter() - t_test
            save = last or due
            metrics.update(startup, time_report_s=report_s, checkpointed=save,
                           time_to_first_step_s=(runner.first_step_at or time.time()) - attempt_start)
            t_ckpt = time.perf_counter()
            ckpt = None
            name = f"checkpoint_epoch_{epoch:04d}"
            if save and rank == 0:
                target = Path(storage.build_checkpoint_path_from_name(name)) if in_place else \
                    Path(tempfile.mkdtemp(prefix="rs-ckpt-"))
                _save_checkpoint(target, runner, {"epoch": epoch, "best_epoch": best_epoch, "best_metrics": best,
                                                  "drops": drops, "last_drop": last_drop, "best_step": best_step,
                                                  "drop_step": drop_step, "final": last}, best_weights)
            metrics["time_checkpoint_s"] = time.perf_counter() - t_ckpt if save else 0.0
            now = time.perf_counter()
            metrics["time_epoch_s"] = now - mark
            metrics["wall_time_s"] = wall_base + time.time() - attempt_start
            history.append(metrics)
            pending.append(metrics)
            if save and rank == 0:
                (target / HISTORY_FILE).write_text(json.dumps(history))
                ckpt = ray.train.Checkpoint.from_directory(str(target))
                ckpt_cost, last_ckpt = time.perf_counter() - t_ckpt, time.perf_counter()
            mark = time.perf_counter()
            # The rows go when `ready`; a checkpoint always goes at once (each one is registered
            # with its own report), waiting for the reporter if need be.
            if ready or save:
                last_sent = time.perf_counter()
                reporter.send(pending, checkpoint=ckpt, checkpoint_dir_name=name if save else None,
                              checkpoint_upload_mode=CheckpointUploadMode.NO_UPLOAD if in_place
                              else CheckpointUploadMode.SYNC, delete_local_checkpoint_after_upload=not in_place)
                pending = []
            # Only in a Tune run's first attempt, so the retry it causes gets past this epoch.
            if epoch == tc.fail_at_epoch and not same_run:
                if pending:
                    reporter.send(pending)
                    pending = []
                reporter.wait()
                raise InjectedFailure(f"train.fail_at_epoch={epoch}: injected failure after epoch {epoch}")
            if last:
                reporter.close()  # the trial ends once Train has its last epoch
            report_s = time.perf_counter() - mark
            if last:
                break
    except BaseException:
        if world == 1 and pending:  # best effort: what was measured is not lost (one worker: no barrier)
            try:
                reporter.send(pending)
                reporter.wait(timeout=30)
            except BaseException:
                pass
        raise


def _save_checkpoint(target: Path, runner: Runner, meta: dict, best_weights: BestWeights) -> None:
    """Write a checkpoint directory: the full state (or, once training is over, only the best
    weights: nothing will resume from it), and the best weights when they are not this epoch's."""
    target.mkdir(parents=True, exist_ok=True)
    final = meta["final"]
    torch.save(meta if final else {**runner.state_dict(), **meta}, target / STATE_FILE)
    if final or meta["best_epoch"] != meta["epoch"]:
        torch.save(best_weights.ready(), target / BEST_FILE)


def _final_metrics(runner: Runner, test_split, best_weights: BestWeights, best_epoch: int, best: dict,
                   metric: str, num_classes: int, n_val: int) -> dict[str, Any]:
    """Test the best-validation weights. `learned` asks whether the best validation top-k error
    (k from `primary_k`) is clearly below chance: see `clearly_below_chance`."""
    runner.model.load_state_dict(best_weights.ready())
    test = runner.evaluate(test_split)
    k = primary_k(num_classes)
    return {**{f"test_{key}": v for key, v in test.items()}, "best_epoch": best_epoch,
            "best_val_top5_error": best["val_top5_error"], "select_metric": metric,
            "best_val_error": best[metric], "num_classes": num_classes,
            "learned": bool(clearly_below_chance(best[f"val_top{k}_error"], num_classes, n_val, k=k))}
