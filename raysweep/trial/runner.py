"""One trial's model, optimizer, schedule and random streams, with its training and evaluation
passes. No Ray: the trial loop, the benchmarks and the tests drive it alike.

Batches arrive as uint8 NHWC on the device; augmentation (random-resized-crop and flip) and
normalisation run there as batched tensor ops, so the device never waits on per-sample Python.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from raysweep.config import TrainConfig
from raysweep.trial.metrics import Meter, top_k_wrong
from raysweep.trial.model import build_model

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PRECISIONS = ("bf16", "fp16", "fp32")


def augment(x: torch.Tensor, gen: torch.Generator, scale_min: float, hflip: bool) -> torch.Tensor:
    """Random-resized-crop (area in [scale_min, 1], aspect in [3/4, 4/3]) + flip, as one batched
    bilinear resample; uint8 NHWC in, float NCHW (0..255) out, same size. scale_min 1: flips only."""
    n, h, w, _ = x.shape
    dev = x.device
    if scale_min >= 1.0:  # no crop: flips only, without a resample (a quarter of a small CPU step)
        out = x.permute(0, 3, 1, 2).float()
        if hflip:
            flip = torch.rand(n, generator=gen, device=dev) < 0.5
            out = torch.where(flip[:, None, None, None], out.flip(3), out)
        return out
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
    split, in whole epochs of this subset (rounded), so a smaller subset gets more epochs.
    With early stopping (`tc.patience`) this is the cap, not the count."""
    if tc.budget == "epochs":
        return tc.epochs
    steps = tc.epochs * math.ceil(n_full / tc.batch_size)
    return max(1, round(steps / math.ceil(n_train / tc.batch_size)))


# glibc hands blocks of 128 KB and more (a CPU step's activations and gradients) back to the
# kernel when freed and maps them afresh at the next step, page by page: measured on a 2-core
# machine at 64 px, 15% of the loop's CPU time went to page faults in the kernel. Keeping freed
# memory in the process (blocks up to 32 MB from the heap, and no trimming below 512 MB) took
# that to 2%, and the loop from 861 to 1,058 img/s, in the same run of the same loop.
MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024  # glibc's ceiling for this setting on 64-bit
TRIM_THRESHOLD_BYTES = 512 * 1024 * 1024
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
_allocator_tuned: bool | None = None


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed blocks for reuse (see MMAP_THRESHOLD_BYTES), once per
    process. Both settings are needed: either alone was slower than neither. False where the C
    library is not glibc (macOS, musl): nothing changes there."""
    global _allocator_tuned
    if _allocator_tuned is None:
        import ctypes
        import ctypes.util

        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            mallopt = libc.mallopt
            libc.gnu_get_libc_version  # noqa: B018  (glibc only: its mallopt takes these parameters)
        except (OSError, AttributeError):
            _allocator_tuned = False
        else:
            _allocator_tuned = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
                                    and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
    return _allocator_tuned


def _fp32_head(model: nn.Module) -> None:
    """Run the last Linear layer (the classifier head) in fp32 under autocast, so logits, the
    loss and top-k ranks are not rounded to 8 bits of mantissa (bf16 ties top-k entries)."""
    head = None
    for module in model.modules():
        if isinstance(module, nn.Linear):
            head = module
    if head is None:
        return
    forward = head.forward

    def fp32_forward(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            return forward(x.float())

    head.forward = fp32_forward


class Runner:
    """Model, optimizer, schedule and RNGs of one trial, with its train and eval passes."""

    def __init__(self, tc: TrainConfig, num_classes: int, seed: int, device: torch.device,
                 total_steps: int, rank: int = 0, wrap: Callable | None = None,
                 model: tuple[str, float] = ("alexnet", 1.0), precision: str | None = None):
        self.tc, self.device = tc, device
        cuda = device.type == "cuda"
        if not cuda:
            keep_freed_memory()
        # CPU trains in fp32: bf16 autocast on a CPU is slower than fp32 on most of them.
        self.precision = (precision or ("bf16" if tc.bf16 else "fp32")) if cuda else "fp32"
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        self.autocast = (lambda: torch.autocast("cuda", dtype=dtype)) if dtype else nullcontext
        self.scaler = torch.amp.GradScaler("cuda") if self.precision == "fp16" else None
        # NHWC suits oneDNN's CPU convolutions too (measured at 64 px: 23% faster steps, 35% faster
        # evaluation than NCHW), not only cuDNN's tensor cores.
        self.memory_format = torch.channels_last if tc.channels_last else torch.contiguous_format
        torch.manual_seed(seed)  # weight init and dropout
        if cuda:
            torch.cuda.manual_seed(seed + rank)
        name, width = model
        self.model = build_model(num_classes, tc.dropout, name, width).to(device, memory_format=self.memory_format)
        if dtype is not None:
            _fp32_head(self.model)
        self.net = wrap(self.model) if wrap else self.model
        if cuda and tc.compile:
            self.net = torch.compile(self.net)
        params, fused = self.model.parameters(), cuda or None
        if tc.optimizer == "sgd":
            self.opt = torch.optim.SGD(params, lr=tc.lr, momentum=tc.momentum,
                                       weight_decay=tc.weight_decay, fused=fused)
        else:
            self.opt = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay, fused=fused)
        base = lr_factor(tc, total_steps)
        self.lr_scale = 1.0  # lowered by the loop at each plateau (schedule "plateau")
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda step: base(step) * self.lr_scale)
        # Batch order (CPU) and augmentation (device) get their own streams, seeded from the trial.
        self.order = torch.Generator().manual_seed(seed * 1_000_003 + 17 + rank)
        self.aug = torch.Generator(device=device).manual_seed(seed * 1_000_003 + 29 + rank)
        scale = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1) * 255
        self._mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1) * 255
        self._inv_std = 1.0 / scale
        self.steps = 0  # optimizer steps taken, over the whole trial (restored with the state)
        self.first_step_at: float | None = None  # time.time() of this attempt's first step

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
            loss = F.cross_entropy(logits.float(), y)
        self.opt.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            loss.backward()
            self.opt.step()
        self.steps += 1
        if self.first_step_at is None:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)  # once: the step has really run
            self.first_step_at = time.time()
        return loss.detach(), logits.detach()

    def drop_lr(self, gamma: float) -> None:
        """Scale the learning rate by `gamma` from the next step on (a plateau)."""
        self.lr_scale *= gamma
        for group, base_lr, fn in zip(self.opt.param_groups, self.sched.base_lrs, self.sched.lr_lambdas):
            group["lr"] = base_lr * fn(self.sched.last_epoch)  # now, not from the next step

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
                "train_top5_error": m["top5"], "images_per_sec": meter.samples / elapsed,
                "steps": self.steps, "time_train_s": elapsed, "trained_at": time.time()}

    @torch.no_grad()
    def evaluate(self, split) -> dict[str, float]:
        """Deterministic: the stored crop, normalised; every row counts (no drop, no pad).
        Logits are fp32 (the head runs in fp32), so loss and top-k are not rounded."""
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
                "scheduler": self.sched.state_dict(), "steps": self.steps, "lr_scale": self.lr_scale,
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "rng": {"torch": torch.get_rng_state(), "order": self.order.get_state(),
                        "aug": self.aug.get_state(),
                        "cuda": torch.cuda.get_rng_state(self.device) if cuda else None}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.steps = int(state.get("steps", 0))
        self.lr_scale = float(state.get("lr_scale", 1.0))
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        self.order.set_state(rng["order"])
        self.aug.set_state(rng["aug"])
        if rng["cuda"] is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.device)


class BestWeights:
    """The best-validation weights, kept in host memory between checkpoints.

    The buffers are allocated once (pinned on CUDA) and refreshed with asynchronous copies, so
    a new best costs one device-to-host copy that overlaps the next epoch's compute.
    """

    def __init__(self, model: nn.Module):
        pin = next(model.parameters()).device.type == "cuda"
        self.tensors = {k: torch.empty(v.shape, dtype=v.dtype, pin_memory=pin)
                        for k, v in model.state_dict().items()}
        self.valid = False

    def capture(self, model: nn.Module) -> None:
        for k, v in model.state_dict().items():
            self.tensors[k].copy_(v.detach(), non_blocking=True)
        self.valid = True

    def load(self, weights: dict[str, torch.Tensor]) -> None:
        for k, v in weights.items():
            self.tensors[k].copy_(v)
        self.valid = True

    def ready(self) -> dict[str, torch.Tensor]:
        """The weights, once every pending copy has landed."""
        if any(t.is_pinned() for t in self.tensors.values()):
            torch.cuda.synchronize()
        return self.tensors
