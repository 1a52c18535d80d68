"""`python -m raysweep.bench gpu`: the acceptance run for the first machine with a GPU (under 8 min).

Stages, in order, each started only if it still fits the time limit:
  speed    model alone (one fixed on-device batch) vs the trial loop (gather, on-device
           augmentation, step, metrics) in img/s at batch 128, channels_last, bf16 on and off,
           and eval img/s; compiled variants run last, as they cost a compile each
  memory   peak memory with a fraction-1 mini-ImageNet trial's splits held on the device,
           beside raysweep.cluster.gpu's estimate (data + reserve)
  packing  1, 2 and 4 fraction-1/16 trials on one GPU as concurrent processes, each under its
           memory budget (set_per_process_memory_fraction): aggregate img/s, OOMs, budgets
  sweep    a 2-trial, 3-epoch sweep through Ray (python -m raysweep.tune, synthetic data):
           per-epoch overhead = time_epoch_s - time_train_s - time_eval_s
The device's data is random uint8 of the real shapes: the speed of the loop does not depend on
the pixels. The last line printed is a JSON object. Without CUDA it exits 2 with one line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from raysweep.errors import RaysweepError, cli_entry

GIB = 1024**3
MINI_IMAGENET = {"train": 50_000, "validation": 10_000, "test": 5_000}  # rows; 500 per class x 100 classes
CLASSES = 100


class _Fmt(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m raysweep.bench gpu", description=__doc__, formatter_class=_Fmt)
    p.add_argument("--batch-size", type=int, default=128, help="training batch")
    p.add_argument("--eval-batch-size", type=int, default=512, help="evaluation batch")
    p.add_argument("--steps", type=int, default=50, help="timed optimizer steps per round")
    p.add_argument("--rounds", type=int, default=3, help="alternating model/loop rounds per variant (best counts)")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps first (compiles, cuDNN autotuning)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    p.add_argument("--pack", type=int, nargs="+", default=[1, 2, 4], metavar="K", help="trials packed on one GPU")
    p.add_argument("--pack-fraction", type=float, default=0.0625, help="training fraction of each packed trial")
    p.add_argument("--pack-seconds", type=float, default=10.0, help="timed seconds of each packing run")
    p.add_argument("--no-sweep", action="store_true", help="skip the sweep through Ray")
    p.add_argument("--sweep-epochs", type=int, default=3, help="epochs of each of the sweep's 2 trials")
    p.add_argument("--limit-s", type=float, default=420.0,
                   help="no stage starts unless it can end within this many seconds of the start")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="run every stage at toy sizes on the CPU to check the bench itself (figures meaningless)")
    p.add_argument("--pack-worker", default=None, help=argparse.SUPPRESS)  # internal: one packed trial
    return p


def _first_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0]}"


def _require_cuda() -> None:
    from raysweep.cluster.resources import physical_gpus

    if physical_gpus() == 0:  # answers without importing torch
        raise RaysweepError("bench gpu: no CUDA device is available (no NVIDIA GPU in /proc/driver/nvidia/gpus "
                            "or from nvidia-smi); run it on a machine with a GPU (--cpu-smoke checks the bench itself)")
    import torch

    if not torch.cuda.is_available():
        from raysweep.cluster.gpu import no_cuda_reason

        reason, fix = no_cuda_reason(torch)
        raise RaysweepError(f"bench gpu: no CUDA device is available to torch: {reason}; fix: {fix}")


def _smi(query: str) -> list[str]:
    """`nvidia-smi --query-...=... --format=csv,noheader,nounits` lines; [] if it cannot answer."""
    if not shutil.which("nvidia-smi"):
        return []
    try:
        return subprocess.run(["nvidia-smi", query, "--format=csv,noheader,nounits"], capture_output=True,
                              text=True, timeout=10).stdout.strip().splitlines()
    except (OSError, subprocess.SubprocessError):
        return []


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _random_split(n: int, size: int, device, classes: int, seed: int = 0):
    """A DeviceSplit of n random uint8 images, filled in chunks (no wide temporaries)."""
    import torch

    from raysweep.trial.device_data import DeviceSplit

    g = torch.Generator(device=device).manual_seed(seed)
    images = torch.empty((n, size, size, 3), dtype=torch.uint8, device=device)
    for a in range(0, n, 2048):
        images[a:a + 2048].random_(0, 256, generator=g)
    return DeviceSplit(images, torch.randint(0, classes, (n,), device=device, generator=g))


def _runner(args, device, bf16: bool, compile_: bool):
    from raysweep.config import TrainConfig
    from raysweep.trial.runner import Runner

    tc = TrainConfig(batch_size=args.batch_size, eval_batch_size=args.eval_batch_size, bf16=bf16,
                     channels_last=True, compile=compile_, schedule="constant")
    return Runner(tc, args.classes, seed=0, device=device, total_steps=10**9, model=("alexnet", args.width))


def _reserve(args) -> int:
    from raysweep.cluster.gpu import measure_footprint, training_reserve_bytes
    from raysweep.trial.model import build_model

    fp = measure_footprint(build_model(args.classes, width=args.width), args.image_size, "bf16")
    return training_reserve_bytes(fp, batch_size=args.batch_size, eval_batch_size=args.eval_batch_size,
                                  image_size=args.image_size, precision="bf16")


# --- stages ------------------------------------------------------------------------------

def _speed(args, device, bf16: bool, compile_: bool) -> dict:
    """Model alone vs the trial loop, alternating rounds (each side's best), then eval img/s."""
    import torch

    bs = args.batch_size
    train = _random_split(bs * args.steps, args.image_size, device, args.classes, seed=1)
    val = _random_split(args.eval_batch_size * 8, args.image_size, device, args.classes, seed=2)
    runner = _runner(args, device, bf16, compile_)
    x = torch.randn(bs, 3, args.image_size, args.image_size, device=device).contiguous(
        memory_format=runner.memory_format)
    y = torch.randint(0, args.classes, (bs,), device=device)
    t0 = time.perf_counter()
    for _ in range(args.warmup):
        runner.step(x, y)
    runner.train_epoch(train, max_steps=args.warmup)
    runner.evaluate(val)
    _sync(device)
    warmup_s = time.perf_counter() - t0
    model, loop = [], []
    for _ in range(args.rounds):
        runner.net.train()
        _sync(device)
        t = time.perf_counter()
        for _ in range(args.steps):
            loss, _ = runner.step(x, y)
        loss.item()
        model.append(args.steps * bs / (time.perf_counter() - t))
        _sync(device)
        loop.append(runner.train_epoch(train, max_steps=args.steps)["images_per_sec"])
    _sync(device)
    t = time.perf_counter()
    runner.evaluate(val)
    eval_img_s = len(val) / (time.perf_counter() - t)  # evaluate() ends on a read-back: synced
    out = {"bf16": bf16 and device.type == "cuda", "compile": compile_, "channels_last": True,
           "model_img_s": round(max(model), 1), "loop_img_s": round(max(loop), 1),
           "loop_vs_model": round(max(loop) / max(model), 4), "eval_img_s": round(eval_img_s, 1),
           "warmup_s": round(warmup_s, 1)}
    del runner, train, val, x
    if compile_:
        torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def _memory(args, device, reserve: int) -> dict:
    """Hold a fraction-1 trial's splits (what the residency plan allows), train and evaluate:
    the allocator's peak beside the estimate."""
    import torch

    from raysweep.trial.residency import bytes_by_split, memory_budget, plan_residency, row_bytes, stream_bytes

    rows = args.rows
    sizes = bytes_by_split(rows, args.image_size)
    cuda = device.type == "cuda"
    total = torch.cuda.get_device_properties(device).total_memory if cuda else 1 << 62
    plan = plan_residency(sizes, memory_budget(total, 1.0), reserve,
                          stream_bytes(args.batch_size, args.eval_batch_size, args.image_size))
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    held = {name: _random_split(n, args.image_size, device, args.classes, seed=i)
            for i, (name, n) in enumerate(rows.items()) if plan[name]}
    held_bytes = sum(sizes[name] for name in held)
    if "train" not in held:  # it would stream: a few batches stand in for it
        held["train"] = _random_split(args.batch_size * 4, args.image_size, device, args.classes, seed=9)
        held_bytes += len(held["train"]) * row_bytes(args.image_size)
    runner = _runner(args, device, bf16=True, compile_=False)
    out = {"rows": rows, "on_device": plan, "held_gib": round(held_bytes / GIB, 3),
           "reserve_estimate_gib": round(reserve / GIB, 3)}
    for when in ("first", "steady"):  # the first pass includes cuDNN's autotuning workspaces
        runner.train_epoch(held["train"], max_steps=args.steps)
        runner.evaluate(held.get("validation", held["train"]))
        _sync(device)
        if cuda:
            peak_alloc, peak_res = torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device)
            out.update({f"{when}_peak_allocated_gib": round(peak_alloc / GIB, 3),
                        f"{when}_peak_reserved_gib": round(peak_res / GIB, 3)})
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
    if cuda:
        out.update(reserve_measured_gib=round(out["steady_peak_reserved_gib"] - held_bytes / GIB, 3),
                   estimate_covers_peak=out["steady_peak_reserved_gib"] * GIB <= held_bytes + reserve)
    del runner, held
    if cuda:
        torch.cuda.empty_cache()
    return out


def _context_mib(specs: list[dict]) -> list[float]:
    """Each packed process's device memory outside its allocator (its CUDA context), by nvidia-smi."""
    used = {}
    for line in _smi("--query-compute-apps=pid,used_memory"):
        try:
            pid, mib = line.split(",")
            used[int(pid)] = float(mib)
        except ValueError:  # "[N/A]" in some containers
            continue
    ready = [json.loads(Path(s["ready"]).read_text()) for s in specs]
    return [used[r["pid"]] - r["reserved"] / 2**20 for r in ready if r["pid"] in used]


def _pack(args, device, reserve: int, k: int) -> dict:
    """k packed trials as processes: all warm up, then train together for --pack-seconds."""
    import numpy as np

    from raysweep.cluster.gpu import trial_rows

    labels = np.repeat(np.arange(args.classes), max(1, args.rows["train"] // args.classes))
    rows = trial_rows(labels, args.pack_fraction, args.rows["validation"], args.rows["test"])
    with tempfile.TemporaryDirectory(prefix="rs-pack-") as tmp:
        common = {"device": str(device), "share": 1.0 / k, "rows": rows, "reserve": reserve, "go": f"{tmp}/go",
                  "seconds": args.pack_seconds, **{a: getattr(args, a) for a in (
                      "classes", "image_size", "batch_size", "eval_batch_size", "warmup", "width")}}
        specs = [{**common, "ready": f"{tmp}/ready{i}", "seed": i} for i in range(k)]
        logs = [open(Path(tmp) / f"err{i}", "w+") for i in range(k)]
        procs = [subprocess.Popen([sys.executable, "-m", "raysweep.bench.gpu", "--pack-worker", json.dumps(s)],
                                  stdout=subprocess.PIPE, stderr=log, text=True) for s, log in zip(specs, logs)]
        deadline = time.monotonic() + 300

        def all_ready() -> bool:
            return all(Path(s["ready"]).exists() for s in specs)

        while time.monotonic() < deadline and not all_ready() and all(p.poll() is None for p in procs):
            time.sleep(0.1)
        context = _context_mib(specs) if all_ready() and device.type == "cuda" else []
        Path(common["go"]).touch()
        results = []
        for p, log in zip(procs, logs):
            try:
                stdout, _ = p.communicate(timeout=args.pack_seconds + 300)
            except subprocess.TimeoutExpired:
                p.kill()
                stdout, _ = p.communicate()
            log.seek(0)
            try:
                results.append(json.loads(stdout.strip().splitlines()[-1]))
            except (IndexError, ValueError):
                tail = (log.read().strip().splitlines() or [f"exit {p.returncode}"])[-1]
                results.append({"oom": "OutOfMemoryError" in tail, "error": tail[:300]})
            log.close()
    ok = [r for r in results if "images" in r]
    out = {"trials": k, "share": round(1.0 / k, 4), "rows": rows, "oom": any(r.get("oom") for r in results),
           "errors": [r["error"] for r in results if "error" in r]}
    if len(ok) == k:
        out.update(aggregate_img_s=round(sum(r["images"] for r in ok) / max(r["seconds"] for r in ok), 1),
                   per_trial_img_s=[round(r["images"] / r["seconds"], 1) for r in ok],
                   on_device=ok[0]["on_device"], peak_reserved_gib=round(max(r["peak_reserved"] for r in ok) / GIB, 3))
        if ok[0]["budget"] is not None:
            out.update(budget_gib=round(ok[0]["budget"] / GIB, 3),
                       within_budget=all(r["peak_reserved"] <= r["budget"] for r in ok))
    if context:
        out["context_mib"] = round(statistics.median(context), 1)
    return out


def _pack_worker(spec: dict) -> int:
    """One packed trial (a child of `_pack`): prints one JSON line."""
    import torch

    from raysweep.trial.residency import apply_memory_budget, bytes_by_split, plan_residency, stream_bytes

    args = argparse.Namespace(**spec)
    device, size, bs = torch.device(args.device), args.image_size, args.batch_size
    cuda = device.type == "cuda"
    try:
        if cuda:
            torch.cuda.set_device(device)
            torch.backends.cudnn.benchmark = True
        budget = apply_memory_budget(device, args.share) if cuda else 1 << 62
        plan = plan_residency(bytes_by_split(args.rows, size), budget, args.reserve,
                              stream_bytes(bs, args.eval_batch_size, size))
        held = {name: _random_split(n, size, device, args.classes, seed=args.seed)
                for name, n in args.rows.items() if plan[name]}
        train = held["train"] if "train" in held else _random_split(bs * 8, size, device, args.classes, args.seed)
        runner = _runner(args, device, bf16=True, compile_=False)
        runner.train_epoch(train, max_steps=args.warmup)
        _sync(device)
        ready = Path(args.ready)
        ready.with_suffix(".tmp").write_text(json.dumps(
            {"pid": os.getpid(), "reserved": torch.cuda.memory_reserved(device) if cuda else 0}))
        ready.with_suffix(".tmp").replace(ready)
        deadline = time.monotonic() + 600
        while not Path(args.go).exists():
            if time.monotonic() > deadline:
                raise RuntimeError("the packing run never started (no go file)")
            time.sleep(0.02)
        steps = max(1, min(len(train) // bs, 20))
        images, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < args.seconds:
            runner.train_epoch(train, max_steps=steps)  # ends on a read-back: synced
            images += min(len(train), steps * bs)
        result = {"images": images, "seconds": time.perf_counter() - t0, "budget": budget if cuda else None,
                  "on_device": plan, "peak_reserved": torch.cuda.max_memory_reserved(device) if cuda else 0,
                  "oom": False}
    except torch.OutOfMemoryError as err:
        result = {"oom": True, "error": _first_line(err)}
    print(json.dumps(result), flush=True)
    return 3 if result["oom"] else 0


def epoch_overheads(exp_dir: Path) -> dict:
    """Per-epoch overhead (time_epoch_s - time_train_s - time_eval_s) of a sweep's trials, from
    Tune's result.json lines, as `raysweep.bench overhead` counts it: on epochs that wrote no
    checkpoint (with checkpoint time apart), each (trial, epoch) once."""
    keys = ("time_epoch_s", "time_train_s", "time_eval_s")
    rows: dict[tuple, dict] = {}
    for path in sorted(Path(exp_dir).glob("*/result.json")):
        for line in path.read_text().splitlines():
            try:
                m = json.loads(line)
            except ValueError:
                continue
            if all(k in m for k in keys):
                rows.setdefault((path.parent.name, m.get("epoch")), m)
    if not rows:
        return {"epochs": 0, "note": "no epoch with time_epoch_s, time_train_s and time_eval_s in the results"}
    plain = [m for m in rows.values() if not m.get("checkpointed")] or list(rows.values())
    over = [m["time_epoch_s"] - m["time_train_s"] - m["time_eval_s"] for m in plain]
    ckpt = [m["time_checkpoint_s"] for m in rows.values() if m.get("checkpointed") and "time_checkpoint_s" in m]
    report = [m["time_report_s"] for m in rows.values() if "time_report_s" in m]
    med = lambda xs: round(statistics.median(xs), 4) if xs else None  # noqa: E731
    return {"epochs": len(rows), "epochs_measured": len(plain), "overhead_s_median": med(over),
            "overhead_s_max": round(max(over), 4), "checkpoint_s_median": med(ckpt), "report_s_median": med(report)}


def _sweep(args, timeout_s: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="rs-bench-sweep-") as tmp:
        cmd = [sys.executable, "-m", "raysweep.tune", "--data", "synthetic", "--fractions", "1", "0.5",
               "--seeds", "0", "--epochs", str(args.sweep_epochs), "--gpus-per-trial", "0.5",  # both at once
               "--storage-path", tmp, "--name", "bench-gpu",
               "--quiet", "--set", f"data.cache_dir={tmp}/cache", "--set", "data.synthetic_classes=100",
               "--set", "data.synthetic_train_per_class=20"]
        t0 = time.monotonic()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return {"error": f"the sweep did not finish within {timeout_s:.0f} s"}
        out = {"returncode": proc.returncode, "wall_s": round(time.monotonic() - t0, 1),
               **epoch_overheads(Path(tmp) / "bench-gpu")}
        if proc.returncode:
            out["error"] = (proc.stderr.strip().splitlines() or [""])[-1][:300]
        return out


# --- the run -----------------------------------------------------------------------------

def _smoke(args) -> None:
    # A quarter-width AlexNet at 64 px: the same code paths at about 1/16 of the cost.
    args.image_size, args.batch_size, args.eval_batch_size, args.classes, args.width = 64, 8, 16, 10, 0.25
    args.steps, args.rounds, args.warmup, args.pack_seconds = 2, 1, 1, 1.0
    args.rows = {"train": 160, "validation": 32, "test": 16}
    args.pack, args.pack_fraction, args.no_compile, args.no_sweep = [1, 2], 0.25, True, True


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.pack_worker:
        return _pack_worker(json.loads(args.pack_worker))
    start = time.monotonic()
    args.image_size, args.classes, args.rows, args.width = 227, CLASSES, dict(MINI_IMAGENET), 1.0
    if args.cpu_smoke:
        _smoke(args)
    else:
        _require_cuda()
    if min(args.batch_size, args.eval_batch_size, args.steps, args.rounds) < 1 or not 0 < args.pack_fraction <= 1:
        raise RaysweepError("--batch-size, --eval-batch-size, --steps, --rounds must be >= 1; --pack-fraction in (0, 1]")
    import torch

    device = torch.device("cpu") if args.cpu_smoke else torch.device("cuda", 0)
    out: dict = {"device": "cpu (smoke run)", "capability": None, "driver": None, "torch": torch.__version__,
                 "cuda": torch.version.cuda, "batch_size": args.batch_size, "image_size": args.image_size}
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
        props = torch.cuda.get_device_properties(device)
        out.update(device=props.name, capability=f"{props.major}.{props.minor}", cudnn=torch.backends.cudnn.version(),
                   driver=(_smi("--query-gpu=driver_version") or [None])[0],
                   gpu_memory_gib=round(props.total_memory / GIB, 2))
    print(f"bench gpu: {out['device']}, torch {out['torch']} (CUDA {out['cuda']})", flush=True)
    out.update(speed=[], packing={}, skipped=[])

    def stage(name: str, need_s: float, fn):
        left = args.limit_s - (time.monotonic() - start)
        if left < need_s:
            out["skipped"].append(f"{name} (needs ~{need_s:.0f} s, {max(left, 0):.0f} s left)")
            return None
        t = time.monotonic()
        try:
            result = fn()
        except Exception as err:  # report and go on: one broken stage must not hide the others
            traceback.print_exc()
            result = {"error": _first_line(err)}
        print(f"bench gpu: {name} ({time.monotonic() - t:.0f} s): {json.dumps(result)}", flush=True)
        return result

    precisions = (True, False) if device.type == "cuda" else (False,)  # a CPU trains in fp32 either way
    for bf16 in precisions:
        r = stage(f"speed bf16={bf16} compile=False", 20, lambda: _speed(args, device, bf16, False))
        out["speed"] += [r] if r else []
    reserve = _reserve(args)
    out["memory"] = stage("memory at fraction 1", 40, lambda: _memory(args, device, reserve))
    for k in args.pack:
        r = stage(f"packing {k} trial(s)", 45 + args.pack_seconds, lambda: _pack(args, device, reserve, k))
        if r:
            out["packing"][str(k)] = r
    if not args.no_sweep:
        left = args.limit_s - (time.monotonic() - start) - (0 if args.no_compile else 200)
        out["sweep"] = stage("sweep through Ray", 90, lambda: _sweep(args, max(60.0, left)))
    if not args.no_compile:
        for bf16 in precisions:
            r = stage(f"speed bf16={bf16} compile=True", 100, lambda: _speed(args, device, bf16, True))
            out["speed"] += [r] if r else []
    out["wall_s"] = round(time.monotonic() - start, 1)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
