"""One trial's worker loop (`train_loop_per_worker`), run by Ray Train on each of its workers.

Each epoch trains, evaluates, asks the stop rule, maybe checkpoints, and reports once with
where its time went. Reports leave from a thread of their own (raysweep.trial.reporting), so
the loop never waits for Train's controller to collect one. Checkpoints carry the metrics of
every epoch so far: a restarted worker replays them, and the sweep's trial logs keep every
epoch once. The loop's only Ray calls are `ray.train` ones: context, report, checkpoints.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from raysweep.config import ModelConfig, TrainConfig
from raysweep.trial.checkpoints import (BEST_FILE, LEDGER_FILE, STATE_FILE, load_best_weights,  # noqa: F401
                                        read_checkpoint, read_ledger, save_checkpoint, write_history,
                                        write_ledger)
from raysweep.trial.device_data import StreamSplit, load_splits
from raysweep.trial.metrics import clearly_below_chance, primary_k
from raysweep.trial.model import describe
from raysweep.trial.reporting import Reporter
from raysweep.trial.runner import BestWeights, Runner, epochs_for_budget
from raysweep.trial.stopping import StopRule

CHECKPOINT_SHARE = 0.02  # automatic cadence: checkpoints take at most this share of the time
# Epochs go to Train at most this often (a checkpoint, and the last epoch, go at once): shorter
# epochs travel together. Each report wakes Train's controller and Tune's driver.
REPORT_EVERY_S = 1.0
ASSUMED_WRITE_BYTES_S = 500e6  # sustained write speed assumed before a checkpoint has been timed
HOST_DATA_SHARE = 0.5  # host memory a CPU trial may fill with its data: the rest streams


class InjectedFailure(RuntimeError):
    """Raised by `train.fail_at_epoch` to exercise resume."""


def train_loop_per_worker(config: dict) -> None:
    t_enter = time.time()
    import ray.train
    import ray.train.torch

    logging.getLogger("ray.train").setLevel(logging.WARNING)  # Train logs every checkpoint at INFO
    tc, mc = TrainConfig(**config["train"]), ModelConfig(**config["model"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = _setup_device(tc)
    clock = AttemptClock(config, rank, t_enter)
    reporter = Reporter(ray.train.report, after=clock.delivered if rank == 0 else None)
    state, history, best_saved = read_checkpoint(ray.train.get_checkpoint())
    if state and state.get("final"):  # the trial had ended: only replay its epochs to Tune
        reporter.send(history)
        reporter.close()
        return

    # Data: this worker's shard of the subset, whole validation and test, on its own node.
    t_data = time.time()
    splits = _load_data(config, rank, world, device, tc)
    n_shard = len(splits["train"])
    max_epochs = epochs_for_budget(tc, n_shard, max(n_shard, config["n_full"] // world))

    # Model, optimizer, stop rule; resumed from the checkpoint when there is one.
    wrap = (lambda m: ray.train.torch.prepare_model(m, move_to_device=False)) if world > 1 else None
    runner = Runner(tc, int(config["num_classes"]), int(config["seed"]), device,
                    max_epochs * math.ceil(n_shard / tc.batch_size), rank, wrap, model=(mc.name, mc.width),
                    precision=config.get("precision"))
    best_weights = BestWeights(runner.model)
    stop_rule = StopRule(tc, config["select_metric"], pass_steps=math.ceil(config["n_full"] / world / tc.batch_size))
    start = 1
    if state:
        best_weights.load(best_saved)
        runner.load_state_dict(state)
        stop_rule.load_state_dict(state)
        start = state["epoch"] + 1
        if history:  # this attempt's Tune files may lack them; the trial logs drop repeats
            reporter.send(history)
    del state, best_saved
    # resumed_from_epoch: the checkpoint this attempt started from (0: the start), so a retry
    # shows which epochs it ran again.
    static = {**clock.startup(t_data, time.time() - t_data), **_where(splits), "resumed_from_epoch": start - 1,
              "n_train": int(config["n_train"]), "world_size": world}
    cadence = CheckpointCadence(config, runner)
    outbox = Outbox(reporter)

    try:
        for epoch in range(start, max_epochs + 1):
            row = {"epoch": epoch, **runner.train_epoch(splits["train"], reduce=world > 1)}
            t_eval = time.perf_counter()
            row.update({f"val_{k}": v for k, v in runner.evaluate(splits["validation"]).items()})
            row.update(static, time_eval_s=time.perf_counter() - t_eval)

            if stop_rule.improved(epoch, row, runner.steps):
                best_weights.capture(runner.model)
            decision = stop_rule.decide(epoch, runner.steps)
            if decision == "drop_lr":
                runner.drop_lr(tc.step_gamma)
            stop = decision == "stop"
            last = stop or epoch == max_epochs
            save, ready = last or cadence.due(epoch, outbox.reporter.idle()), outbox.ready()
            if world > 1:  # rank 0 decides for every rank, or a collective (or report) would hang
                stop, last, save, ready = _agree(device, stop, last, save, ready)

            if last:
                row.update(_test(runner, splits["test"], best_weights, stop_rule, config, mc),
                           stopped_early=bool(stop and epoch < max_epochs), max_epochs=max_epochs,
                           train_loss_slope=stop_rule.slope,
                           **_gpu_memory(device, config))
            row.update(time_report_s=outbox.report_s, checkpointed=save,
                       time_to_first_step_s=(runner.first_step_at or time.time()) - clock.attempt_start)
            ckpt = None
            t_ckpt = time.perf_counter()
            if save and rank == 0:
                ckpt = _write_checkpoint(config, epoch, last, runner, stop_rule, best_weights)
            row["time_checkpoint_s"] = time.perf_counter() - t_ckpt if save else 0.0
            row["time_epoch_s"] = outbox.since_last()
            row["wall_time_s"] = clock.wall_time()
            history.append(row)
            if ckpt:
                write_history(ckpt[1], history)
                cadence.saved(time.perf_counter() - t_ckpt)
            outbox.put(row, send=ready or save, checkpoint=ckpt)

            if epoch == tc.fail_at_epoch and not clock.same_run:  # first attempt only: the retry gets past it
                outbox.flush(wait=True)
                raise InjectedFailure(f"train.fail_at_epoch={epoch}: injected failure after epoch {epoch}")
            if last:
                reporter.close()  # the trial ends once Train has its last epoch
                break
    except BaseException:
        if world == 1:  # best effort: what was measured is not lost (one worker: no barrier)
            outbox.flush(wait=True, swallow=True)
        raise


# --- the pieces of the loop ------------------------------------------------------------------

def _setup_device(tc: TrainConfig) -> torch.device:
    import ray.train.torch

    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
        torch.cuda.reset_peak_memory_stats(device)
    else:
        torch.set_num_threads(_cpu_threads(tc))
    return device


def _cpu_threads(tc: TrainConfig) -> int:
    if tc.num_threads:
        return tc.num_threads
    import ray

    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU") or os.cpu_count() or 1
    return max(1, int(cpus))


def _where(splits: dict) -> dict[str, str]:
    """The node this worker trains on, as Ray names it, and the nodes whose read tasks loaded
    its resident splits (the cache is read on the worker's own node: PreparedData.dataset).

    Its address is `worker_ip`: Tune fills in `node_ip` of every result itself, with the
    address of the node of the trial's Tune actor, over whatever the trial reported."""
    import ray

    read = set().union(*(getattr(s, "read_nodes", set()) for s in splits.values()))
    return {"node_id": ray.get_runtime_context().get_node_id(), "worker_ip": ray.util.get_node_ip_address(),
            "data_node_ids": ",".join(sorted(read))}


class AttemptClock:
    """Wall time summed over a trial's attempts. A retry inside the same Tune run starts where
    the previous attempt's last report left off (the ledger, written by rank 0 once Train has a
    report); a new Tune run (a resume) counts its own start-up too."""

    def __init__(self, config: dict, rank: int, t_enter: float):
        self.config, self.t_enter = config, t_enter
        self.run_dir = Path(config["run_dir"]) if config.get("run_dir") else None
        ledger = read_ledger(self.run_dir) if rank == 0 and self.run_dir else None
        self.same_run = bool(ledger) and ledger.get("token") == config["token"]
        self.base = float(ledger["wall_time_s"]) if ledger else 0.0
        self.attempt_start = t_enter if self.same_run else float(config["trial_start"])

    def delivered(self, rows: list[dict]) -> None:  # in the reporter's thread
        if self.run_dir is not None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_ledger(self.run_dir, {"token": self.config["token"], "epoch": rows[-1]["epoch"],
                                        "wall_time_s": rows[-1]["wall_time_s"]})

    def startup(self, t_data: float, data_load_s: float) -> dict[str, float]:
        """Where this attempt's start-up went; a retry inside the same Tune run has no setup/launch."""
        fit_start = float(self.config.get("fit_start") or self.attempt_start)
        return {"time_startup_s": t_data - self.attempt_start, "time_data_load_s": data_load_s,
                "time_setup_s": 0.0 if self.same_run else fit_start - self.attempt_start,
                "time_launch_s": 0.0 if self.same_run else self.t_enter - fit_start}

    def wall_time(self) -> float:
        return self.base + time.time() - self.attempt_start


def _load_data(config: dict, rank: int, world: int, device: torch.device, tc: TrainConfig) -> dict:
    """This worker's splits, read through Ray Data on its own node (where the cache preflight
    checked the cache is): its shard of the subset, whole validation and test. Held on the
    device (or in host memory) while they fit, train first; streamed otherwise."""
    import ray.data

    from raysweep.data import stratified_subset
    from raysweep.trial.residency import agree_on_residency, bytes_by_split, plan_device_residency

    ray.data.DataContext.get_current().enable_progress_bars = False  # the sweep's display is the one view
    prepared = config["prepared"]
    subset = stratified_subset(prepared.labels("train"), config["fraction"], config["seed"])
    # Equal shards, so every DDP rank takes the same number of steps (at most world-1 rows unused).
    indices = {"train": subset[rank::world][:len(subset) // world], "validation": None, "test": None}
    rows = {"train": len(indices["train"]), "validation": config["n_val"], "test": config["n_test"]}
    size = config["image_size"]
    if device.type == "cuda":
        resident = plan_device_residency(rows, size, device, config.get("gpu_share") or 1.0,
                                         reserve=config["reserve_bytes"], batch_size=tc.batch_size,
                                         eval_batch_size=tc.eval_batch_size)
    else:
        import psutil  # a Ray dependency

        room, resident = HOST_DATA_SHARE * psutil.virtual_memory().available, {}
        for name, need in bytes_by_split(rows, size).items():
            resident[name] = need <= room
            room -= need if resident[name] else 0
        resident = agree_on_residency(resident)
    # The resident splits are read together, in one Ray Data execution, and note where their
    # read tasks ran (28 bytes a row); a streamed split, read every epoch, goes on its own.
    held = [name for name in rows if resident[name]]
    splits = {}
    if held:
        ds = prepared.datasets({name: indices[name] for name in held}, read_node=True)
        splits.update(load_splits(ds, {name: rows[name] for name in held}, device))
    for name in rows:
        if name not in splits:
            splits[name] = StreamSplit(prepared.dataset(name, indices=indices[name]), rows[name], device)
    return {name: splits[name] for name in rows}


def _agree(device: torch.device, *flags: bool) -> tuple[bool, ...]:
    """Rank 0's decisions, for every rank."""
    t = torch.tensor(flags, dtype=torch.int64, device=device if device.type == "cuda" else "cpu")
    torch.distributed.broadcast(t, src=0)
    return tuple(bool(f) for f in t.tolist())


class CheckpointCadence:
    """Every `sweep.checkpoint_every` epochs, or (0) whenever the time since the last one is
    large enough that checkpoints take at most CHECKPOINT_SHARE of the trial's time."""

    def __init__(self, config: dict, runner: Runner):
        self.every = int(config["checkpoint_every"])
        state_bytes = sum(t.numel() * t.element_size() for t in runner.model.state_dict().values())
        copies = 3 if runner.tc.optimizer == "adamw" else 2
        self.cost = state_bytes * copies / ASSUMED_WRITE_BYTES_S
        self.last = time.perf_counter()

    def due(self, epoch: int, idle: bool) -> bool:
        """`idle`: the last report has been collected. An automatic checkpoint waits for that:
        a report with a checkpoint goes at once, and Train's one-slot report queue is emptied
        once per controller poll (every 2 s in Ray 2.60), so a checkpoint sent while a report
        is out held the loop until the next poll: short epochs ran at one per poll."""
        if self.every > 0:
            return epoch % self.every == 0
        return idle and time.perf_counter() - self.last >= self.cost / CHECKPOINT_SHARE

    def saved(self, seconds: float) -> None:
        self.cost, self.last = seconds, time.perf_counter()


class Outbox:
    """Epoch rows on their way to Train: they gather while a report is still out, and go
    together with the next (`put(send=True)`); a checkpoint always goes at once."""

    def __init__(self, reporter: Reporter):
        self.reporter, self.pending = reporter, []
        self.last_sent = -math.inf  # the first epoch goes at once
        self.mark = time.perf_counter()  # the end of the last hand-over
        self.report_s = 0.0  # how long the last hand-over took

    def ready(self) -> bool:
        return self.reporter.idle() and time.perf_counter() - self.last_sent >= REPORT_EVERY_S

    def since_last(self) -> float:
        return time.perf_counter() - self.mark

    def put(self, row: dict, send: bool, checkpoint=None) -> None:
        from ray.train import CheckpointUploadMode

        self.pending.append(row)
        t = time.perf_counter()
        if send:
            self.last_sent = t
            kwargs = {}
            if checkpoint is not None:
                in_place, path = checkpoint
                import ray.train

                kwargs = {"checkpoint": ray.train.Checkpoint.from_directory(path),
                          "checkpoint_dir_name": Path(path).name if in_place else None,
                          "checkpoint_upload_mode": CheckpointUploadMode.NO_UPLOAD if in_place
                          else CheckpointUploadMode.SYNC,
                          "delete_local_checkpoint_after_upload": not in_place}
            self.reporter.send(self.pending, **kwargs)
            self.pending = []
        self.mark = time.perf_counter()
        self.report_s = self.mark - t

    def flush(self, wait: bool = False, swallow: bool = False) -> None:
        try:
            if self.pending:
                self.reporter.send(self.pending)
                self.pending = []
            if wait:
                self.reporter.wait(timeout=30)
        except BaseException:
            if not swallow:
                raise


def _write_checkpoint(config: dict, epoch: int, last: bool, runner: Runner, stop_rule: StopRule,
                      best_weights: BestWeights) -> tuple[bool, str]:
    """Write this epoch's checkpoint; returns (in place, its directory). In place: straight
    into the Train run directory, where Train keeps it (the sweep says whether its storage
    allows it); else a temp dir that Train uploads."""
    name = f"checkpoint_epoch_{epoch:04d}"
    root = config.get("checkpoint_root")
    target = Path(root) / name if root else Path(tempfile.mkdtemp(prefix="rs-ckpt-")) / name
    meta = {"epoch": epoch, "final": last, **stop_rule.state_dict()}
    save_checkpoint(target, {} if last else runner.state_dict(), meta, best_weights.ready())
    return bool(root), str(target)


def _test(runner: Runner, test_split, best_weights: BestWeights, stop_rule: StopRule, config: dict,
          mc: ModelConfig) -> dict[str, Any]:
    """Test the best-validation weights. `learned` asks whether the best validation top-k error
    (k from `primary_k`) is clearly below chance: see `clearly_below_chance`."""
    t = time.perf_counter()
    runner.model.load_state_dict(best_weights.ready())
    test = runner.evaluate(test_split)
    num_classes, best, metric = int(config["num_classes"]), stop_rule.best, config["select_metric"]
    k = primary_k(num_classes)
    return {**{f"test_{key}": v for key, v in test.items()}, "best_epoch": stop_rule.best_epoch,
            "best_val_top5_error": best["val_top5_error"], "select_metric": metric,
            "best_val_error": best[metric], "num_classes": num_classes,
            "num_params": sum(p.numel() for p in runner.model.parameters()),
            "model": describe(mc.name, mc.width),
            "learned": bool(clearly_below_chance(best[f"val_top{k}_error"], num_classes, config["n_val"], k=k)),
            "time_test_s": time.perf_counter() - t}


def _gpu_memory(device: torch.device, config: dict) -> dict[str, int]:
    """A GPU trial's peak allocator bytes, beside what the sweep planned for it (its data and
    the model's reserve, raysweep.cluster.gpu)."""
    if device.type != "cuda":
        return {}
    from raysweep.trial.residency import bytes_by_split

    rows = {"train": int(config["n_train"]), "validation": int(config["n_val"]), "test": int(config["n_test"])}
    estimate = sum(bytes_by_split(rows, int(config["image_size"])).values()) + int(config["reserve_bytes"])
    return {"gpu_peak_bytes": int(torch.cuda.max_memory_allocated(device)), "gpu_estimate_bytes": int(estimate)}
