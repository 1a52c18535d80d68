"""GPU memory and precision: a trial's memory budget, which splits it holds on the device, how
many trials share a GPU (`--gpus-per-trial auto`), and the CUDA check each GPU node passes first.

The decisions are pure functions of byte counts and capabilities; torch is imported only by
the few functions that measure or touch a device.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from raysweep.errors import RaysweepError

GIB = 1024**3
MIB = 1024**2
SPLITS = ("train", "validation", "test")  # residency priority: train matters most for speed
LABEL_BYTES = 8  # int64 label beside each uint8 image
# Device memory a CUDA process uses outside torch's caching allocator (context, loaded kernels,
# cuBLAS/cuDNN handles), so outside set_per_process_memory_fraction. 300-600 MiB is typical
# with lazy module loading (CUDA >= 11.7); `python -m raysweep.bench gpu` measures it.
CUDA_CONTEXT_BYTES = 768 * MIB
WORKSPACE_BYTES = 512 * MIB  # cuDNN/cuBLAS workspaces (benchmark mode picks algos that fit)
SLACK = 1.10  # caching-allocator rounding and fragmentation
# Transient bytes per image pixel around a step, besides the saved activations:
# train: uint8 gather 3 + sampling grid 8 + float crop 12 + channels_last copy 12;
# eval: uint8 slice 3 + float 12 + the autocast copy of the input 6.
TRAIN_INPUT_BYTES_PER_PIXEL = 35
EVAL_INPUT_BYTES_PER_PIXEL = 21
STREAM_BATCHES = 4  # batches a streamed split keeps on the device (Ray Data's prefetch + the current one)
MAX_TRIALS_PER_GPU = 4
PROBE_GPU_SHARE = 0.01  # what the CUDA preflight's task asks for on each GPU node
# `training_reserve_bytes(measure_footprint(alexnet), ...)` for the default recipe (AlexNet, 100
# classes, 227 px, bf16, SGD with momentum, batch 128, eval batch 512) is 2.36 GiB; a test
# keeps this in step with the measurement.
DEFAULT_RESERVE_BYTES = int(2.4 * GIB)
PRECISIONS = ("fp32", "fp16", "bf16")  # weakest first: a sweep trains in the weakest its nodes allow


# --- sizes ---------------------------------------------------------------------------------

def row_bytes(image_size: int) -> int:
    """Device bytes of one cached row: a uint8 HxWx3 image and its int64 label."""
    return image_size * image_size * 3 + LABEL_BYTES


def bytes_by_split(rows: Mapping[str, int], image_size: int) -> dict[str, int]:
    """Device bytes of each split held whole: {"train": n_train, ...} rows -> bytes."""
    return {name: int(n) * row_bytes(image_size) for name, n in rows.items()}


def stream_bytes(batch_size: int, eval_batch_size: int, image_size: int) -> dict[str, int]:
    """Device bytes a split still takes when it streams: a few batches in flight."""
    per = STREAM_BATCHES * row_bytes(image_size)
    return {"train": per * batch_size, "validation": per * eval_batch_size, "test": per * eval_batch_size}


def trial_rows(train_labels, fraction: float, n_val: int, n_test: int) -> dict[str, int]:
    """Rows a trial holds: its stratified training subset (same size for every seed), val and test."""
    from raysweep.data.subsets import stratified_subset

    return {"train": len(stratified_subset(train_labels, fraction, 0)), "validation": int(n_val),
            "test": int(n_test)}


def need_by_fraction(train_labels, n_val: int, n_test: int, fractions: Sequence[float], image_size: int,
                     reserve: int) -> dict[float, int]:
    """Device bytes of each fraction's trial with every split held: the input of `auto_gpu_shares`."""
    return {float(f): sum(bytes_by_split(trial_rows(train_labels, f, n_val, n_test), image_size).values()) + reserve
            for f in fractions}


# --- the model's reserve -------------------------------------------------------------------

@dataclass(frozen=True)
class Footprint:
    """What a model keeps on the device besides data, per parameter and per image."""
    params: int
    activation_bytes_per_image: int  # saved for backward, at the training precision
    largest_activation_per_image: int  # the biggest single saved tensor (the eval/backward transient)


def measure_footprint(model, image_size: int, precision: str = "bf16") -> Footprint:
    """Measure a (CPU) model's saved-for-backward bytes per image, at `precision`.

    Runs a copy forward on the CPU at batch 1 and 2 under `saved_tensors_hooks` and takes the
    difference, so weights (and autocast's weight copies) drop out and only what grows with
    the batch remains. fp16 is measured as bf16 (same widths). The caller's model and the
    global RNG are left untouched. AlexNet (100 classes, 227 px): 57.4 M parameters,
    3.79 MB/image in fp32, 2.25 MB/image in bf16.
    """
    import torch

    net = copy.deepcopy(model).cpu().float().train()
    dtype = None if precision == "fp32" else torch.bfloat16

    def saved(batch: int) -> list[int]:
        sizes: dict[int, int] = {}

        def pack(t):
            st = t.untyped_storage()
            sizes.setdefault(st.data_ptr(), st.nbytes())
            return t

        with torch.random.fork_rng(devices=[]), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            net(torch.randn(batch, 3, image_size, image_size))
        return list(sizes.values())

    one, two = saved(1), saved(2)
    growth = [b - a for a, b in zip(one, two)] if len(one) == len(two) else [sum(two) - sum(one)]
    return Footprint(params=sum(p.numel() for p in net.parameters()),
                     activation_bytes_per_image=max(0, sum(two) - sum(one)),
                     largest_activation_per_image=max([0, *growth]))


def training_reserve_bytes(fp: Footprint, *, batch_size: int, eval_batch_size: int, image_size: int,
                           precision: str = "bf16", optimizer: str = "sgd", momentum: float = 0.9,
                           ddp: bool = False) -> int:
    """Device bytes a trial needs besides its data splits, inside torch's allocator.

    Static: fp32 weights + grads + optimizer state (SGD momentum 1 copy, AdamW 2), autocast's
    half-precision weight copies, DDP's gradient buckets. Transient: the larger of a training
    step (saved activations, one backward transient, the augmentation's buffers) and an eval
    batch (input buffers, a layer's input and output). Plus workspaces, times SLACK.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    state = {"sgd": 4 if momentum else 0, "adamw": 8}[optimizer]
    per_param = 4 + 4 + state + (0 if precision == "fp32" else 2) + (4 if ddp else 0)
    pixels = image_size * image_size
    train = batch_size * (fp.activation_bytes_per_image + 2 * fp.largest_activation_per_image
                          + TRAIN_INPUT_BYTES_PER_PIXEL * pixels)
    evaluate = eval_batch_size * (2 * fp.largest_activation_per_image + EVAL_INPUT_BYTES_PER_PIXEL * pixels)
    return int(math.ceil((fp.params * per_param + max(train, evaluate) + WORKSPACE_BYTES) * SLACK))


# --- budget and residency ------------------------------------------------------------------

def memory_budget(total_bytes: int, share: float, context_bytes: int = CUDA_CONTEXT_BYTES) -> int:
    """Allocator bytes for a trial holding `share` of a GPU of `total_bytes`.

    Each process also pays a CUDA context outside the allocator, so k trials at share 1/k
    together stay within the device: k * (total/k - context) + k * context = total.
    """
    if not share > 0:
        raise ValueError(f"a GPU share must be > 0, got {share}")
    return max(0, int(total_bytes * min(float(share), 1.0)) - int(context_bytes))


def apply_memory_budget(device, share: float) -> int:
    """Cap this process's allocator on `device` at its share; returns the budget in bytes.

    Below a whole GPU the cap is enforced (`set_per_process_memory_fraction`): an allocation
    past it raises OutOfMemoryError in this trial instead of starving its neighbours. With a
    whole GPU the budget is also bounded by what is free now (another tenant may be there).
    """
    import torch

    total = torch.cuda.get_device_properties(device).total_memory
    budget = memory_budget(total, share)
    if share < 1:
        torch.cuda.set_per_process_memory_fraction(float(budget / total), device)
    else:
        free, _ = torch.cuda.mem_get_info(device)
        budget = min(budget, int(free) + torch.cuda.memory_reserved(device))
    return budget


def plan_residency(split_bytes: Mapping[str, int], budget: int, reserve: int,
                   stream_bytes: Mapping[str, int] | None = None) -> dict[str, bool]:
    """Which splits live on the device (True) and which stream (False), train first, then
    validation, then test: each goes on the device if it fits beside the reserve and what is
    already there. A streamed split still costs its `stream_bytes` (batches in flight)."""
    order = [s for s in SPLITS if s in split_bytes] + [s for s in split_bytes if s not in SPLITS]
    stream = dict(stream_bytes or {})
    used = int(reserve) + sum(stream.get(s, 0) for s in order)
    plan = {}
    for name in order:
        with_it = used - stream.get(name, 0) + int(split_bytes[name])
        plan[name] = with_it <= budget
        if plan[name]:
            used = with_it
    return plan


def plan_device_residency(rows: Mapping[str, int], image_size: int, device, share: float = 1.0, *,
                          reserve: int = DEFAULT_RESERVE_BYTES, batch_size: int = 128,
                          eval_batch_size: int = 512) -> dict[str, bool]:
    """In a trial's worker: cap its memory at its GPU share, decide which splits it holds
    (train, then validation, then test), and agree with the other ranks. rows: split -> rows
    this worker holds (its train shard, whole val and test)."""
    budget = apply_memory_budget(device, share)
    plan = plan_residency(bytes_by_split(rows, image_size), budget, reserve,
                          stream_bytes(batch_size, eval_batch_size, image_size))
    return agree_on_residency(plan, device)


def agree_on_residency(plan: Mapping[str, bool], device=None) -> dict[str, bool]:
    """All ranks of a DDP trial adopt the same plan: a split is on the device only where it
    fits on every rank (all-reduce MIN). A no-op without an initialised process group.

    A rank that streams while another holds the split would desynchronise the trainer's
    lockstep `streaming_split`, so disagreement must not happen.
    """
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return dict(plan)
    names = sorted(plan)  # the same order on every rank
    on = torch.device("cpu")
    if "nccl" in str(dist.get_backend()):  # NCCL reduces CUDA tensors only
        on = device if device is not None else torch.device("cuda", torch.cuda.current_device())
    votes = torch.tensor([int(bool(plan[n])) for n in names], dtype=torch.int32, device=on)
    dist.all_reduce(votes, op=dist.ReduceOp.MIN)
    return {n: bool(v) for n, v in zip(names, votes.tolist())}


# --- --gpus-per-trial auto -----------------------------------------------------------------

def auto_gpu_shares(need_bytes: Mapping[float, int], gpu_memory_bytes: int,
                    max_per_gpu: int = MAX_TRIALS_PER_GPU) -> dict[float, float]:
    """The GPU share of each fraction's trial: 1/k for the largest k in {4, 2, 1} such that

    - size: the trial trains on at most 1/k of the training split (k <= 1/fraction), so a
      packed trial has at most the work of a whole-GPU trial spread over its k neighbours;
    - memory: all its splits plus its reserve (`need_bytes`) fit the budget of a 1/k share
      (`memory_budget`), so packed trials never run out of memory and never stream.

    Powers of two only, so shares of different fractions still tile a GPU exactly.
    """
    shares = {}
    for fraction, need in need_bytes.items():
        k = 1
        for cand in (4, 2):
            if cand <= max_per_gpu and cand * fraction <= 1 + 1e-9 \
                    and need <= memory_budget(gpu_memory_bytes, 1 / cand):
                k = cand
                break
        shares[fraction] = 1.0 / k
    return shares


# --- precision and the CUDA preflight ------------------------------------------------------

def choose_precision(capability: Sequence[int], bf16: bool) -> str:
    """"bf16" where asked and native (compute capability >= 8.0); else "fp16" with a gradient
    scaler where tensor cores exist (>= 7.0); else "fp32". bf16=False means fp32."""
    if not bf16:
        return "fp32"
    cap = tuple(capability)
    return "bf16" if cap >= (8, 0) else "fp16" if cap >= (7, 0) else "fp32"


def no_cuda_reason(torch) -> tuple[str, str]:
    """(reason, fix) when torch.cuda.is_available() is False, in the driver's own words."""
    if torch.version.cuda is None:
        return (f"torch {torch.__version__} is a CPU-only build",
                "install a CUDA build of torch (https://pytorch.org/get-started/locally/)")
    try:
        torch.cuda.init()
        msg = "torch sees no CUDA device"
    except Exception as err:  # the driver's own words: "too old", "no NVIDIA driver", ...
        msg = (str(err).strip().splitlines() or [type(err).__name__])[0]
    low = msg.lower()
    if "too old" in low:
        return (f"the NVIDIA driver is too old for torch {torch.__version__} (built for CUDA "
                f"{torch.version.cuda}): {msg}", "update the NVIDIA driver, or install a torch build for an older CUDA")
    if "no nvidia driver" in low:
        return ("no NVIDIA driver found (torch.cuda.is_available() is False)",
                "install the NVIDIA driver (in a container: the NVIDIA Container Toolkit and --gpus)")
    return f"torch cannot use CUDA: {msg}", "check the GPU with nvidia-smi, or install a torch build that matches its driver"


def probe_cuda(bf16: bool = True) -> dict[str, Any]:
    """On this node: can torch use CUDA, at what capability, and does a tiny convolution train
    (forward + backward) in the precision chosen for it? Never raises: failures are data."""
    out: dict[str, Any] = {"ok": False, "reason": "", "fix": "", "precision": None, "capability": None,
                           "name": "", "gpus": 0, "total_memory": 0, "torch": None, "torch_cuda": None}
    try:
        import torch
    except Exception as err:
        out.update(reason=f"torch cannot be imported: {err}", fix="install the project's requirements")
        return out
    out.update(torch=torch.__version__, torch_cuda=torch.version.cuda)
    if not torch.cuda.is_available():
        out["reason"], out["fix"] = no_cuda_reason(torch)
        return out
    n = torch.cuda.device_count()
    props = [torch.cuda.get_device_properties(i) for i in range(n)]
    cap = min((p.major, p.minor) for p in props)
    precision = choose_precision(cap, bf16)
    out.update(gpus=n, capability=list(cap), name=props[0].name, precision=precision,
               total_memory=min(int(p.total_memory) for p in props))
    try:
        dev = torch.device("cuda", 0)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        conv = torch.nn.Conv2d(3, 16, 3, padding=1).to(dev)
        x = torch.randn(8, 3, 32, 32, device=dev)
        with torch.autocast("cuda", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            loss = conv(x).float().square().mean()
        if precision == "fp16":
            torch.amp.GradScaler("cuda").scale(loss).backward()
        else:
            loss.backward()
        torch.cuda.synchronize(dev)
        if not bool(torch.isfinite(conv.weight.grad).all()):
            raise RuntimeError("the gradient is not finite")
    except Exception as err:
        msg = (str(err).strip().splitlines() or [type(err).__name__])[0]
        if "no kernel image" in msg.lower():
            out.update(reason=f"this torch build has no kernels for compute capability {cap[0]}.{cap[1]} "
                              f"(it has {' '.join(torch.cuda.get_arch_list())})",
                       fix="install a torch build for this GPU")
        elif precision == "bf16":
            out.update(reason=f"a bf16 convolution failed: {msg}", fix="--set train.bf16=false")
        else:
            out.update(reason=f"a {precision} convolution failed: {msg}",
                       fix="check the GPU with nvidia-smi, or install a torch build that matches its driver")
        return out
    out["ok"] = True
    return out


@dataclass(frozen=True)
class CudaReport:
    """What the trials must use: one precision for the whole sweep, and the smallest GPU."""
    precision: str
    gpu_memory_bytes: int
    capability: tuple[int, int]
    nodes: int
    notes: list[str] = field(default_factory=list)


def summarize_cuda_probes(results: Sequence[Mapping[str, Any]], bf16: bool) -> CudaReport:
    """Probe results (each with a "node" label) -> the sweep's precision, or one error line.

    The weakest node decides the precision, so every trial of a sweep trains alike and the
    scaling curve compares like with like.
    """
    if not results:
        raise RaysweepError("CUDA preflight: no GPU node to check (the cluster has no node with GPUs)")
    bad = [r for r in results if not r.get("ok")]
    if bad:
        r = bad[0]
        more = f" (and {len(bad) - 1} more node(s))" if len(bad) > 1 else ""
        raise RaysweepError(f"CUDA preflight failed on node {r.get('node', '?')}: {r.get('reason')}{more}; "
                            f"fix: {r.get('fix')}")
    weakest = min(results, key=lambda r: PRECISIONS.index(r["precision"]))
    precision = weakest["precision"]
    notes = []
    if bf16 and precision != "bf16":
        cap = weakest["capability"]
        how = "fp16 with a gradient scaler" if precision == "fp16" else "fp32"
        notes.append(f"bf16 needs compute capability 8.0; node {weakest.get('node', '?')} has {cap[0]}.{cap[1]}: "
                     f"every trial trains in {how} (--set train.bf16=false for fp32)")
    return CudaReport(precision=precision, gpu_memory_bytes=min(int(r["total_memory"]) for r in results),
                      capability=tuple(min(tuple(r["capability"]) for r in results)), nodes=len(results), notes=notes)


def cuda_preflight(*, bf16: bool, nodes: Sequence[Mapping[str, Any]] | None = None,
                   timeout_s: float = 180.0, gpu_share: float = PROBE_GPU_SHARE) -> CudaReport:
    """Run `probe_cuda` once on every GPU node (default: the alive nodes with GPUs) and
    summarise. Needs a connected Ray; run it before any trial holds a GPU."""
    from raysweep.cluster import run_on_nodes, trial_nodes

    if nodes is None:
        import ray

        nodes = trial_nodes(ray.nodes(), use_gpu=True)
    # A sliver of a GPU: Ray then sets CUDA_VISIBLE_DEVICES as it does for a trial's worker.
    results = run_on_nodes(probe_cuda, nodes, args=(bf16,), timeout_s=timeout_s, num_gpus=gpu_share)
    return summarize_cuda_probes(results, bf16)
