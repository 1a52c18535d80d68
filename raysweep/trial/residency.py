"""Which of a trial's splits a worker holds on its device, and which stream: the device's
memory budget for a trial's GPU share, and the bytes each split takes. Pure byte arithmetic,
but for the few functions that ask torch about the device.
"""

from __future__ import annotations

from typing import Mapping

GIB = 1024**3
MIB = 1024**2
SPLITS = ("train", "validation", "test")  # residency priority: train matters most for speed
LABEL_BYTES = 8  # int64 label beside each uint8 image
# Device memory a CUDA process uses outside torch's caching allocator (context, loaded kernels,
# cuBLAS/cuDNN handles), so outside set_per_process_memory_fraction. 300-600 MiB is typical
# with lazy module loading (CUDA >= 11.7); `python -m raysweep.bench gpu` measures it.
CUDA_CONTEXT_BYTES = 768 * MIB
STREAM_BATCHES = 4  # batches a streamed split keeps on the device (Ray Data's prefetch + the current one)
# `training_reserve_bytes(measure_footprint(alexnet), ...)` (raysweep.cluster.gpu) for the default
# recipe (AlexNet, 100 classes, 227 px, bf16, SGD with momentum, batch 128, eval batch 512) is
# 2.36 GiB; a test keeps this in step with the measurement.
DEFAULT_RESERVE_BYTES = int(2.4 * GIB)


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
