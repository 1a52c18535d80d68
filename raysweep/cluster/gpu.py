"""GPU memory and precision, seen from the sweep: a model's device reserve, how many trials
share a GPU (`--gpus-per-trial auto`), and the CUDA check each GPU node passes first. (What a
worker holds on its device is raysweep.trial.residency.)

The decisions are pure functions of byte counts and capabilities; torch is imported only by
the few functions that measure or touch a device.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from raysweep.errors import RaysweepError
from raysweep.trial.residency import (CUDA_CONTEXT_BYTES, DEFAULT_RESERVE_BYTES, GIB, MIB,  # noqa: F401
                                     bytes_by_split, memory_budget, plan_residency, row_bytes,
                                     stream_bytes)

WORKSPACE_BYTES = 512 * MIB  # cuDNN/cuBLAS workspaces (benchmark mode picks algos that fit)
SLACK = 1.10  # caching-allocator rounding and fragmentation
# Transient bytes per image pixel around a step, besides the saved activations:
# train: uint8 gather 3 + sampling grid 8 + float crop 12 + channels_last copy 12;
# eval: uint8 slice 3 + float 12 + the autocast copy of the input 6.
TRAIN_INPUT_BYTES_PER_PIXEL = 35
EVAL_INPUT_BYTES_PER_PIXEL = 21
MAX_TRIALS_PER_GPU = 4
PROBE_GPU_SHARE = 0.01  # what the CUDA preflight's task asks for on each GPU node
PRECISIONS = ("fp32", "fp16", "bf16")  # weakest first: a sweep trains in the weakest its nodes allow


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
