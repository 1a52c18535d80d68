"""`python -m raysweep.bench train`: the trial loop's training speed beside the model's alone.

Loop: a synthetic set goes through the real pipeline (write_synthetic -> prepare -> cache),
is loaded onto the device by the loop's own loader and trained by the loop's own epoch code
(gather, on-device augmentation, step, schedule, metrics). Model: the same model and
optimizer stepping on one fixed random on-device batch. The two alternate in rounds; each
side's fastest round is compared (`ratio`), and the median of the paired round ratios is given
too. The last line printed is a JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from raysweep.config import TrainConfig
from raysweep.errors import RaysweepError, cli_entry

GIB = 1024**3


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m raysweep.bench train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="default: cuda if available, else cpu")
    p.add_argument("--batch-size", type=int, default=None, help="default: 64 on cpu, 128 on cuda")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per round (default: 1 cpu, 100 cuda)")
    p.add_argument("--rounds", type=int, default=None,
                   help="alternating model/loop rounds (default: 10 cpu, where a shared machine is noisy "
                        "and step-by-step alternation lets both sides see the same load; 5 cuda)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps of each first (default: 1 cpu, 20 cuda)")
    p.add_argument("--threads", type=int, default=0, help="torch threads on cpu (default: all cores)")
    p.add_argument("--num-classes", type=int, default=100, help="model head size (default 100)")
    p.add_argument("--hold", type=int, default=0, metavar="N",
                   help="tile the loaded train images to N rows on the device (e.g. 50000 for peak "
                        "memory at a full subset; default: just enough for one round)")
    p.add_argument("--optimizer", choices=["sgd", "adamw"], default="sgd")
    p.add_argument("--no-bf16", action="store_true", help="cuda: train in fp32")
    p.add_argument("--no-channels-last", action="store_true", help="cuda: keep NCHW")
    p.add_argument("--compile", action="store_true", help="cuda: torch.compile the model")
    p.add_argument("--synthetic-images", type=int, default=200,
                   help="train images written and prepared through the pipeline (default 200)")
    p.add_argument("--cache-dir", default=None, help="default: a temporary directory")
    p.add_argument("--address", default=None, help="Ray address to join (default: start a local Ray)")
    return p


def _prepare(args, device: torch.device, n_rows: int):
    """Synthetic set -> real prepare -> the loop's loader; Ray is let go before any timing."""
    import ray

    from raysweep.data import prepare
    from raysweep.data.synthetic import write_synthetic
    from raysweep.trial.device_data import load_split

    with tempfile.TemporaryDirectory(prefix="rs-bench-") as tmp:
        classes = 10
        per_class = max(1, -(-args.synthetic_images // classes))
        src = write_synthetic(Path(tmp) / "src", classes=classes, train_per_class=per_class,
                              val_per_class=1, test_per_class=1, seed=0)
        started = not ray.is_initialized()
        if started:
            ray.init(address=args.address, log_to_driver=False, include_dashboard=False,
                     configure_logging=False)
        try:
            prepared = prepare(str(src), args.cache_dir or Path(tmp) / "cache")
            t0 = time.perf_counter()
            split = load_split(prepared.dataset("train"), len(prepared.labels("train")), device)
            if device.type == "cuda":
                torch.cuda.synchronize()
            load_s = time.perf_counter() - t0
        finally:
            if started:
                ray.shutdown()
    n = len(split)
    print(f"loaded {n} prepared train images {tuple(split.images.shape[1:])} onto {device} "
          f"in {load_s:.2f}s ({n / load_s:.0f} img/s, one-off per trial)")
    if n_rows > n:  # tile on the device: the same data path, a full-size footprint
        idx = torch.arange(n_rows, device=device) % n
        split.images, split.labels = split.images[idx], split.labels[idx]
        print(f"tiled to {n_rows} rows on the device ({n_rows * split.images[0].numel() / GIB:.2f} GiB uint8)")
    return split


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        raise RaysweepError("--device cuda: no CUDA device is visible to torch")
    bs = args.batch_size or (128 if cuda else 64)
    steps = args.steps or (100 if cuda else 1)
    rounds = args.rounds or (5 if cuda else 10)
    warmup = args.warmup if args.warmup is not None else (20 if cuda else 1)
    if min(bs, steps, rounds) < 1:
        raise RaysweepError("--batch-size, --steps and --rounds must be >= 1")
    threads = args.threads or os.cpu_count() or 1
    if not cuda:
        torch.set_num_threads(threads)
    else:
        torch.backends.cudnn.benchmark = True

    from raysweep.trial.runner import Runner

    split = _prepare(args, device, max(args.hold, bs * (steps + warmup)))
    tc = TrainConfig(batch_size=bs, optimizer=args.optimizer, bf16=not args.no_bf16,
                     channels_last=not args.no_channels_last, compile=args.compile, schedule="constant")
    runner = Runner(tc, args.num_classes, seed=0, device=device, total_steps=10**9)
    # A fixed random batch, already normalised-like and in the model's layout: no data work at all.
    x = torch.randn(bs, 3, 227, 227, device=device).contiguous(memory_format=runner.memory_format)
    y = torch.randint(0, args.num_classes, (bs,), device=device)
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def model_round() -> float:
        runner.net.train()
        sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            loss, _ = runner.step(x, y)
        loss.item()  # waits for the last step, as the loop's epoch-end read does
        return steps * bs / (time.perf_counter() - t0)

    def loop_round() -> float:
        sync()
        return runner.train_epoch(split, max_steps=steps)["images_per_sec"]

    for _ in range(warmup):
        runner.step(x, y)
    runner.train_epoch(split, max_steps=warmup)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    model_rates, loop_rates = [], []
    for r in range(rounds):
        model_rates.append(model_round())
        loop_rates.append(loop_round())
        print(f"round {r + 1}/{rounds}: model {model_rates[-1]:.1f} img/s, loop {loop_rates[-1]:.1f} img/s",
              flush=True)
    # Headline: each side's fastest round, as timeit does; other tenants only ever slow a round.
    model_s, loop_s = max(model_rates), max(loop_rates)
    where = f"{torch.cuda.get_device_name(device)}" if cuda else f"cpu, {threads} torch threads"
    print(f"device: {where}; batch {bs}; {steps} step(s) x {rounds} alternating rounds; "
          f"{'bf16' if cuda and tc.bf16 else 'fp32'}"
          f"{', channels_last' if cuda and tc.channels_last else ''}{', compiled' if cuda and tc.compile else ''}")
    print(f"model alone (random on-device batch): {model_s:.1f} img/s best, "
          f"{statistics.median(model_rates):.1f} median")
    print(f"trial loop (cache -> device -> augment -> step): {loop_s:.1f} img/s best, "
          f"{statistics.median(loop_rates):.1f} median")
    out = {"model_img_s": round(model_s, 2), "loop_img_s": round(loop_s, 2),
           "ratio": round(loop_s / model_s, 4),
           "median_ratio": round(statistics.median(l / m for l, m in zip(loop_rates, model_rates)), 4),
           "device": device.type, "batch_size": bs, "steps": steps, "rounds": rounds,
           "train_images_on_device": len(split)}
    if cuda:
        peak = torch.cuda.max_memory_allocated(device) / GIB
        print(f"peak GPU memory allocated: {peak:.2f} GiB (train images on the device: {len(split)})")
        out["peak_gpu_mem_gib"] = round(peak, 3)
    else:
        out["threads"] = threads
    print(json.dumps(out))
    return 0
