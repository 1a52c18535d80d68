"""One trial: the `TorchTrainer` worker loop (`train_loop_per_worker`) and `build_trainer()`.

The trial's images are read once from the prepared cache (Ray Data) into uint8 tensors on
the training device; batches are gathered, augmented and normalised there as batched tensor
ops, so the accelerator never waits on per-sample Python code.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import tempfile
import time
import warnings
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from raysweep.config import Config, TrainConfig
from raysweep.errors import RaysweepError
from raysweep.metrics import Meter, clearly_below_chance, top_k_wrong
from raysweep.model import build_model

if TYPE_CHECKING:
    import ray.train
    from ray.train.torch import TorchTrainer

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BEST_METRIC = "val_top5_error"
STATE_FILE = "state.pt"  # model, optimizer, scheduler, epoch, best-so-far, RNG states
BEST_FILE = "best_model.pt"  # weights of the best epoch so far; absent when that is this epoch
SHM_STAGING_MIN_FREE = 6 * 1024**3  # stage checkpoints in RAM only with room to spare
# Device memory kept free beside a device-resident split: weights, grads, momentum, activations.
DEVICE_HEADROOM = 4 * 1024**3


class InjectedFailure(RuntimeError):
    """Raised by `train.fail_at_epoch` to exercise resume."""


# --- data on the device ------------------------------------------------------------------

class DeviceSplit:
    """A split held on the device: uint8 NHWC images and int64 labels, in cache order."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self, batch_size: int, order: torch.Generator | None = None) -> Iterator[tuple]:
        n = len(self)
        # One small host-to-device copy per epoch; the order generator stays on the CPU.
        perm = torch.randperm(n, generator=order).to(self.images.device) if order is not None else None
        for start in range(0, n, batch_size):  # no drop_last: the short batch counts by its size
            if perm is None:
                yield self.images[start:start + batch_size], self.labels[start:start + batch_size]
            else:
                sel = perm[start:start + batch_size]
                yield self.images[sel], self.labels[sel]


class StreamSplit:
    """Fallback for a split that does not fit on the device: stream it with deep prefetch."""

    def __init__(self, source, n: int, device: torch.device, prefetch: int = 16):
        self.source, self.n, self.device, self.prefetch = source, n, device, prefetch

    def __len__(self) -> int:
        return self.n

    def batches(self, batch_size: int, order: torch.Generator | None = None) -> Iterator[tuple]:
        shuffle = {}
        if order is not None:  # the seed comes from the trial's order generator: reproducible
            shuffle = {"local_shuffle_buffer_size": 16 * batch_size,
                       "local_shuffle_seed": int(torch.randint(2**31 - 1, (1,), generator=order))}
        for b in self.source.iter_torch_batches(
                batch_size=batch_size, device=self.device, prefetch_batches=self.prefetch,
                dtypes={"image": torch.uint8, "label": torch.int64},
                pin_memory=self.device.type == "cuda", **shuffle):
            yield b["image"], b["label"]


def fits_on_device(nbytes: int, device: torch.device) -> bool:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return nbytes + DEVICE_HEADROOM < free
    import psutil  # a Ray dependency

    return nbytes < 0.5 * psutil.virtual_memory().available


def load_split(source, n: int, device: torch.device, chunk: int = 256) -> DeviceSplit:
    """Copy a Ray Data split (Dataset or DataIterator, <= n rows) into device tensors, in order.

    The tensors are allocated once at full size, so loading never needs twice the memory.
    """
    images = labels = None
    filled = 0
    for batch in source.iter_batches(batch_size=chunk, batch_format="numpy", prefetch_batches=4):
        with warnings.catch_warnings():  # Ray's arrays are read-only; they are only copied from
            warnings.simplefilter("ignore", UserWarning)
            x = torch.from_numpy(np.ascontiguousarray(batch["image"], dtype=np.uint8))
            y = torch.from_numpy(np.asarray(batch["label"], dtype=np.int64))
        if images is None:
            images = torch.empty((n, *x.shape[1:]), dtype=torch.uint8, device=device)
            labels = torch.empty(n, dtype=torch.int64, device=device)
        if filled + len(x) > n:
            raise RuntimeError(f"split has more than the {n} rows announced")
        images[filled:filled + len(x)].copy_(x)
        labels[filled:filled + len(x)].copy_(y)
        filled += len(x)
    if not filled:
        raise RaysweepError("a data split is empty: nothing to train or evaluate on")
    return DeviceSplit(images[:filled], labels[:filled])


# --- augmentation, schedule, one trial's state ------------------------------------------

def augment(x: torch.Tensor, gen: torch.Generator, scale_min: float, hflip: bool) -> torch.Tensor:
    """Random-resized-crop (area in [scale_min, 1], aspect in [3/4, 4/3]) + flip, as one batched
    bilinear resample; uint8 NHWC in, float NCHW (0..255) out, same size."""
    n, h, w, _ = x.shape
    dev = x.device
    u = torch.rand((n, 5), generator=gen, device=dev)  # fixed draws per image: reproducible
    area = scale_min + (1.0 - scale_min) * u[:, 0]
    ratio = torch.exp(math.log(3 / 4) + math.log(16 / 9) * u[:, 1])
    sw, sh = (area * ratio).sqrt().clamp(max=1.0), (area / ratio).sqrt().clamp(max=1.0)
    cx, cy = (2 * u[:, 2] - 1) * (1 - sw), (2 * u[:, 3] - 1) * (1 - sh)
    if hflip:
        sw = sw * torch.where(u[:, 4] < 0.5, -1.0, 1.0)
    # The crop is axis-aligned, so the sampling grid is separable: build it by broadcasting
    # (affine_grid's batched matmul costs as much as the resample itself on a CPU).
    base_x = torch.linspace(-1 + 1 / w, 1 - 1 / w, w, device=dev)  # pixel centres, align_corners=False
    base_y = torch.linspace(-1 + 1 / h, 1 - 1 / h, h, device=dev)
    gx = (sw[:, None] * base_x + cx[:, None])[:, None, :].expand(n, h, w)
    gy = (sh[:, None] * base_y + cy[:, None])[:, :, None].expand(n, h, w)
    grid = torch.stack((gx, gy), dim=-1)
    return F.grid_sample(x.permute(0, 3, 1, 2).float(), grid, mode="bilinear",
                         padding_mode="border", align_corners=False)


def lr_factor(tc: TrainConfig, total_steps: int) -> Callable[[int], float]:
    """The lr multiplier at optimizer step `step`, defined on training progress so that both
    budgets work: progress is counted in reference epochs (`tc.epochs` over the whole run)."""
    def factor(step: int) -> float:
        e = step * tc.epochs / total_steps
        if tc.schedule == "step":
            f = tc.step_gamma ** math.floor(e / tc.step_epochs)
        elif tc.schedule == "cosine":
            f = 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))
        else:
            f = 1.0
        if tc.warmup_epochs > 0 and e < tc.warmup_epochs:
            f *= min(1.0, (step + 1) * tc.epochs / total_steps / tc.warmup_epochs)
        return f
    return factor


def epochs_for_budget(tc: TrainConfig, n_train: int, n_full: int) -> int:
    """"epochs": tc.epochs. "steps": the optimizer steps of tc.epochs passes over the full
    split, in whole epochs of this subset (rounded), so a smaller subset gets more epochs."""
    if tc.budget == "epochs":
        return tc.epochs
    steps = tc.epochs * math.ceil(n_full / tc.batch_size)
    return max(1, round(steps / math.ceil(n_train / tc.batch_size)))


class Runner:
    """Model, optimizer, schedule and RNGs of one trial, with its train and eval passes. No Ray."""

    def __init__(self, tc: TrainConfig, num_classes: int, seed: int, device: torch.device,
                 total_steps: int, rank: int = 0, wrap: Callable | None = None):
        self.tc, self.device = tc, device
        cuda = device.type == "cuda"
        self.autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda and tc.bf16 else nullcontext
        self.memory_format = torch.channels_last if cuda and tc.channels_last else torch.contiguous_format
        torch.manual_seed(seed)  # weight init and dropout
        if cuda:
            torch.cuda.manual_seed(seed + rank)
        self.model = build_model(num_classes, tc.dropout).to(device, memory_format=self.memory_format)
        self.net = wrap(self.model) if wrap else self.model
        if cuda and tc.compile:
            self.net = torch.compile(self.net)
        params, fused = self.model.parameters(), cuda or None
        if tc.optimizer == "sgd":
            self.opt = torch.optim.SGD(params, lr=tc.lr, momentum=tc.momentum,
                                       weight_decay=tc.weight_decay, fused=fused)
        else:
            self.opt = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay, fused=fused)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_factor(tc, total_steps))
        # Batch order (CPU) and augmentation (device) get their own streams, seeded from the trial.
        self.order = torch.Generator().manual_seed(seed * 1_000_003 + 17 + rank)
        self.aug = torch.Generator(device=device).manual_seed(seed * 1_000_003 + 29 + rank)
        scale = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1) * 255
        self._mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1) * 255
        self._inv_std = 1.0 / scale

    def inputs(self, x: torch.Tensor, train: bool) -> torch.Tensor:
        """uint8 NHWC batch -> normalised float NCHW in the model's memory format."""
        if train:
            x = augment(x, self.aug, self.tc.crop_scale_min, self.tc.hflip)
        else:
            x = x.permute(0, 3, 1, 2).float()
        x = x.contiguous(memory_format=self.memory_format)
        return x.sub_(self._mean).mul_(self._inv_std)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with self.autocast():
            logits = self.net(x)
            loss = F.cross_entropy(logits, y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return loss.detach(), logits.detach()

    def train_epoch(self, split, max_steps: int | None = None, reduce: bool = False) -> dict[str, float]:
        self.net.train()
        meter, lr = Meter(), self.opt.param_groups[0]["lr"]
        t0 = time.perf_counter()
        for i, (xb, yb) in enumerate(split.batches(self.tc.batch_size, order=self.order)):
            if max_steps is not None and i >= max_steps:
                break
            lr = self.opt.param_groups[0]["lr"]
            loss, logits = self.step(self.inputs(xb, train=True), yb)
            self.sched.step()
            meter.update(len(yb), loss=loss)
            meter.add_counts(len(yb), top1=top_k_wrong(logits, yb, 1), top5=top_k_wrong(logits, yb, 5))
        m = meter.compute()  # reads the device sums back: the epoch's one sync
        elapsed = time.perf_counter() - t0
        if reduce:
            meter.all_reduce()
            m = meter.compute()
        return {"lr": lr, "train_loss": m["loss"], "train_top1_error": m["top1"],
                "train_top5_error": m["top5"], "images_per_sec": meter.samples / elapsed}

    @torch.no_grad()
    def evaluate(self, split) -> dict[str, float]:
        """Deterministic: the stored 227 crop, normalised; every row counts (no drop, no pad)."""
        self.net.eval()
        meter = Meter()
        for xb, yb in split.batches(self.tc.eval_batch_size):
            with self.autocast():
                logits = self.model(self.inputs(xb, train=False))
            logits = logits.float()
            meter.update(len(yb), loss=F.cross_entropy(logits, yb))
            meter.add_counts(len(yb), top1=top_k_wrong(logits, yb, 1), top5=top_k_wrong(logits, yb, 5))
        m = meter.compute()
        return {"loss": m["loss"], "top1_error": m["top1"], "top5_error": m["top5"]}

    def state_dict(self) -> dict[str, Any]:
        cuda = self.device.type == "cuda"
        return {"model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict(),
                "rng": {"torch": torch.get_rng_state(), "order": self.order.get_state(),
                        "aug": self.aug.get_state(),
                        "cuda": torch.cuda.get_rng_state(self.device) if cuda else None}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        self.order.set_state(rng["order"])
        self.aug.set_state(rng["aug"])
        if rng["cuda"] is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.device)


# --- checkpoints -------------------------------------------------------------------------

def _best_key(m: dict[str, float]) -> tuple[float, ...]:
    # val_top5_error decides; ties (common on small sets, certain with <= 5 classes) go to
    # top-1, then loss. A NaN (diverged) epoch is never the best.
    return tuple(math.inf if math.isnan(v) else v for v in (m[BEST_METRIC], m["val_top1_error"], m["val_loss"]))


def load_best_weights(checkpoint_dir: str | Path) -> dict[str, torch.Tensor]:
    """The best-validation weights recorded in one of this loop's checkpoint directories."""
    d = Path(checkpoint_dir)
    if (d / BEST_FILE).exists():
        return torch.load(d / BEST_FILE, map_location="cpu", weights_only=True)
    return torch.load(d / STATE_FILE, map_location="cpu", weights_only=True)["model"]


def checkpoint_config(keep: int = 1) -> "ray.train.CheckpointConfig":
    """Ray Train keeps the `keep` (>= 1) best checkpoints by val_top5_error and, always, the
    latest one (its manager never deletes the newest), which is the one resume reads."""
    from ray.train import CheckpointConfig

    return CheckpointConfig(num_to_keep=max(1, int(keep)), checkpoint_score_attribute=BEST_METRIC,
                            checkpoint_score_order="min")


# --- the worker loop ---------------------------------------------------------------------

def _cpu_threads(tc: TrainConfig) -> int:
    # Ray sets OMP_NUM_THREADS=1 in workers; use what the trial was given instead.
    if tc.num_threads:
        return tc.num_threads
    import ray

    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU") or os.cpu_count() or 1
    return max(1, int(cpus))


def _staging_dir() -> str | None:
    """Where a checkpoint is written before Ray Train copies it to storage.

    AlexNet's state with optimizer moments is ~0.7-1 GB; staging it in RAM (/dev/shm) rather
    than on disk saves a disk write per epoch (measured here: 2.6 s -> 0.6 s an epoch).
    """
    try:
        st = os.statvfs("/dev/shm")
        if st.f_bavail * st.f_frsize > SHM_STAGING_MIN_FREE:
            return "/dev/shm"
    except OSError:
        pass
    return None


def train_loop_per_worker(config: dict) -> None:
    import ray.train
    import ray.train.torch

    # Ray Train logs every checkpoint at INFO; the sweep's progress table is the one display.
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    tc = TrainConfig(**config["train"])
    seed, num_classes = int(config["seed"]), int(config["num_classes"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
    else:
        torch.set_num_threads(_cpu_threads(tc))

    # Load once. Train first: it matters most for speed; val/test are whole on every worker.
    n_shard = config["n_train"] if world == 1 else config["n_train"] // world
    sizes = {"train": n_shard, "validation": config["n_val"], "test": config["n_test"]}
    on_device = fits_on_device(sum(sizes.values()) * config["image_size"] ** 2 * 3, device)
    splits = {}
    for name, n in sizes.items():
        shard = ray.train.get_dataset_shard(name)
        splits[name] = load_split(shard, n, device) if on_device else StreamSplit(shard, n, device)

    num_epochs = epochs_for_budget(tc, n_shard, max(n_shard, config["n_full"] // world))
    wrap = (lambda m: ray.train.torch.prepare_model(m, move_to_device=False)) if world > 1 else None
    runner = Runner(tc, num_classes, seed, device, num_epochs * math.ceil(n_shard / tc.batch_size), rank, wrap)

    start, best_epoch, best, best_weights = 1, 0, None, None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            state = torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=True)
            runner.load_state_dict(state)
            start, best_epoch, best = state["epoch"] + 1, state["best_epoch"], state["best_metrics"]
            best_weights = {k: v.to(device) for k, v in load_best_weights(d).items()}

    for epoch in range(start, num_epochs + 1):
        metrics = {"epoch": epoch, **runner.train_epoch(splits["train"], reduce=world > 1)}
        metrics.update({f"val_{k}": v for k, v in runner.evaluate(splits["validation"]).items()})
        metrics["n_train"] = int(config["n_train"])
        if best is None or _best_key(metrics) < _best_key(best):
            best_epoch, best = epoch, {k: metrics[k] for k in (BEST_METRIC, "val_top1_error", "val_loss")}
            best_weights = {k: v.detach().clone() for k, v in runner.model.state_dict().items()}
        with tempfile.TemporaryDirectory(dir=_staging_dir(), ignore_cleanup_errors=True) as tmp:
            if rank == 0:
                torch.save({**runner.state_dict(), "epoch": epoch, "best_epoch": best_epoch,
                            "best_metrics": best}, Path(tmp) / STATE_FILE)
                if best_epoch != epoch:
                    torch.save(best_weights, Path(tmp) / BEST_FILE)
            if epoch == num_epochs:
                metrics.update(_final_metrics(runner, splits, best_weights, best_epoch, best,
                                              num_classes, config["n_val"]))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp) if rank == 0 else None,
                             checkpoint_dir_name=f"checkpoint_epoch_{epoch:04d}")
        # Fires only in an attempt that started fresh; a resumed attempt is past this epoch anyway.
        if epoch == tc.fail_at_epoch and checkpoint is None:
            raise InjectedFailure(f"train.fail_at_epoch={epoch}: injected failure after epoch {epoch}")


def _final_metrics(runner: Runner, splits: dict, best_weights: dict, best_epoch: int, best: dict,
                   num_classes: int, n_val: int) -> dict[str, Any]:
    """Test the best-validation weights (the checkpoint is already written with the last ones).

    `learned` asks whether the best val top-5 error is clearly below chance (1 - 5/classes):
    see `clearly_below_chance`. With <= 5 classes top-5 is trivially 0, so top-1 decides.
    """
    runner.model.load_state_dict(best_weights)
    test = runner.evaluate(splits["test"])
    k, err = (5, best[BEST_METRIC]) if num_classes > 5 else (1, best["val_top1_error"])
    return {**{f"test_{key}": v for key, v in test.items()}, "best_epoch": best_epoch,
            "best_val_top5_error": best[BEST_METRIC],
            "learned": bool(clearly_below_chance(err, num_classes, n_val, k=k))}


def build_trainer(cfg: Config, prepared, fraction: float, seed: int, *, use_gpu: bool,
                  gpus_per_worker: float = 1.0, num_workers: int = 1,
                  run_config: "ray.train.RunConfig | None" = None) -> "TorchTrainer":
    """A `TorchTrainer` for one (fraction, seed) trial over a `PreparedData`."""
    from ray.train import DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from raysweep.data import stratified_subset

    if use_gpu and not gpus_per_worker > 0:
        raise RaysweepError(f"use_gpu needs a positive GPU share per worker, got {gpus_per_worker}")
    if num_workers < 1:
        raise RaysweepError(f"a trial needs at least one worker, got num_workers={num_workers}")
    labels = prepared.labels("train")
    subset = stratified_subset(labels, fraction, seed)
    config = {"train": asdict(cfg.train), "fraction": float(fraction), "seed": int(seed),
              "num_classes": int(prepared.num_classes), "n_train": len(subset), "n_full": len(labels),
              "n_val": len(prepared.labels("validation")), "n_test": len(prepared.labels("test")),
              "image_size": int(getattr(prepared, "image_size", cfg.data.image_size))}
    resources = {"CPU": cfg.sweep.cpus_per_trial, **({"GPU": gpus_per_worker} if use_gpu else {})}
    # Cache order in, so the seeded batch order is the same on every run and after a resume.
    from ray.data import DataContext

    ingest = copy.deepcopy(DataContext.get_current().execution_options)
    ingest.preserve_order = True
    if run_config is None:
        run_config = RunConfig(
            name=f"{cfg.name}_f{fraction:g}_s{seed}",
            storage_path=str(Path(cfg.sweep.storage_path).expanduser().resolve()),
            checkpoint_config=checkpoint_config(cfg.sweep.keep_checkpoints),
            failure_config=FailureConfig(max_failures=cfg.sweep.max_failures))
    return TorchTrainer(
        train_loop_per_worker, train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=run_config,
        datasets={"train": prepared.dataset("train", indices=subset),
                  "validation": prepared.dataset("validation"), "test": prepared.dataset("test")},
        dataset_config=DataConfig(datasets_to_split=["train"], execution_options=ingest))
