"""Counting the GPUs that are really there, and sizing trials: how many run at once, with
how many workers, CPUs and GPU shares each.

`plan_resources` and `plan_local` are pure or nearly so and import neither torch nor Ray, so a
request the machine cannot serve is refused in well under a second, before Ray starts.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from raysweep.errors import RaysweepError

# CPUs kept out of GPU trials for Ray Data and the GPU trials' own processes. (A CPU trial's reads
# hold no CPU: PreparedData.dataset; its plan uses every core.)
DATA_CPUS = 1
PROC_GPUS = "/proc/driver/nvidia/gpus"  # one entry per GPU the driver (or container) exposes
SMI_TIMEOUT_S = 2.0  # nvidia-smi is only the fallback; a refusal must come within 3 s


@dataclass(frozen=True)
class ResourcePlan:
    use_gpu: bool
    num_workers: int  # TorchTrainer workers per trial
    gpus_per_worker: float  # explicit requests; under "auto", the share until shares are known
    cpus_per_worker: int
    max_concurrent_trials: int
    torch_threads: int  # intra-op threads for a CPU worker (0 = leave to the loop)
    auto: bool = False  # --gpus-per-trial auto
    gpu_shares: Mapping[float, float] = field(default_factory=dict)  # fraction -> GPU share (auto)

    def gpu_share(self, fraction: float) -> float:
        """GPUs per worker of this fraction's trials (0 on a CPU plan)."""
        if not self.use_gpu:
            return 0.0
        for f, share in self.gpu_shares.items():
            if math.isclose(f, fraction, rel_tol=1e-9, abs_tol=1e-12):
                return share
        return self.gpus_per_worker

    def describe(self) -> str:
        if not self.use_gpu:
            per = (f"{self.num_workers} CPU worker{'s' if self.num_workers > 1 else ''} "
                   f"({self.cpus_per_worker} CPU, {self.torch_threads} torch threads{' each, DDP' if self.num_workers > 1 else ''})")
        elif self.auto and self.gpu_shares:
            shares = ", ".join(f"{f:g}: {s:g}" for f, s in sorted(self.gpu_shares.items(), reverse=True))
            per = f"1 GPU worker, GPU share by fraction (auto) {shares}"
        elif self.auto:
            per = "1 GPU worker x 1 GPU (auto: shares follow once GPU memory and data sizes are known)"
        else:
            per = f"{self.num_workers} GPU worker(s) x {self.gpus_per_worker:g} GPU"
        return f"{per} per trial, up to {self.max_concurrent_trials} trial(s) at once"


def plan_resources(*, cluster_cpus: float, cluster_gpus: float, gpus_per_trial: float | str,
                   cpus_per_trial: int, gpus_per_trial_explicit: bool = False,
                   host_cpus: int | None = None, gpu_memory_bytes: int | None = None,
                   trial_bytes: Mapping[float, int] | None = None, max_trials: int = 0,
                   cpu_workers: int = 1) -> ResourcePlan:
    """Decide trial resources for a cluster with `cluster_cpus` CPUs and `cluster_gpus` GPUs.

    A number: GPU trials get one worker per whole GPU (>= 1) or one worker holding that share
    of a GPU (< 1) for every fraction. "auto": one worker per trial, its share by fraction from
    `raysweep.cluster.gpu.auto_gpu_shares(trial_bytes, gpu_memory_bytes)` (trial_bytes: fraction ->
    its splits plus reserve, in bytes); without those yet, one GPU each. With no GPUs a trial
    gets one CPU worker, unless the user explicitly asked for GPUs per trial. `max_trials` (> 0)
    caps the trials at once (sweep.max_concurrent_trials); CPU threads are shared among those.
    `cpu_workers` (sweep.cpu_workers_per_trial): a CPU trial's DDP workers (gloo), each with
    `cpus_per_trial` CPUs.
    """
    cap = max_trials if max_trials > 0 else math.inf
    auto = gpus_per_trial == "auto"
    wants_gpu = auto or float(gpus_per_trial) > 0
    if cluster_gpus > 0 and wants_gpu:
        shares: dict[float, float] = {}
        if auto:
            workers, per_worker = 1, 1.0
            if gpu_memory_bytes and trial_bytes:
                from raysweep.cluster.gpu import auto_gpu_shares

                shares = auto_gpu_shares(trial_bytes, gpu_memory_bytes)
            smallest = min(shares.values(), default=1.0)
        else:
            g = float(gpus_per_trial)
            if g > cluster_gpus:
                raise RaysweepError(f"--gpus-per-trial {g:g} is more than the {cluster_gpus:g} GPU(s) available")
            workers, per_worker = (int(g), 1.0) if g >= 1 else (1, g)
            smallest = g
        concurrent = max(1, int(math.floor(cluster_gpus / smallest + 1e-9)))
        spare_cpus = cluster_cpus - DATA_CPUS
        by_cpu = int(spare_cpus // (workers * cpus_per_trial)) if spare_cpus > 0 else 0
        if by_cpu < 1:
            raise RaysweepError(
                f"the cluster has {cluster_cpus:g} CPU(s): a GPU trial needs {workers * cpus_per_trial} "
                f"plus {DATA_CPUS} kept free for Ray Data (sweep.cpus_per_trial)")
        return ResourcePlan(True, workers, per_worker, cpus_per_trial, int(min(concurrent, by_cpu, cap)), 0,
                            auto=auto, gpu_shares=shares)
    if gpus_per_trial_explicit and not auto and float(gpus_per_trial) > 0:
        raise RaysweepError(
            f"--gpus-per-trial {float(gpus_per_trial):g} asked for, but no GPU is available "
            "(pass --gpus-per-trial 0 to train on the CPU)")
    # A CPU trial reads its data with tasks that hold no CPU (PreparedData.dataset), once, at
    # its start: no CPU needs keeping free for Ray Data, so every core can train a trial.
    workers = max(1, int(cpu_workers))
    concurrent = int(cluster_cpus // (cpus_per_trial * workers))
    if concurrent < 1:
        raise RaysweepError(
            f"the cluster has {cluster_cpus:g} CPU(s): a CPU trial needs sweep.cpus_per_trial={cpus_per_trial} "
            f"x sweep.cpu_workers_per_trial={workers}")
    concurrent = int(min(concurrent, cap))
    cores = host_cpus or int(cluster_cpus)
    threads = max(cpus_per_trial, cores // (concurrent * workers))
    return ResourcePlan(False, workers, 0.0, cpus_per_trial, concurrent, threads)


# --- counting GPUs without torch --------------------------------------------------------

def visible_count(physical: int, cuda_visible_devices: str | None) -> int:
    """How many of `physical` GPUs a process sees under CUDA_VISIBLE_DEVICES, read as CUDA
    reads it: the list stops at the first entry that is invalid, out of range or repeated."""
    if cuda_visible_devices is None:
        return physical
    seen: list[str] = []
    for entry in cuda_visible_devices.split(","):
        entry = entry.strip()
        if entry.startswith(("GPU-", "MIG-")):
            key = entry
        else:
            try:
                idx = int(entry)
            except ValueError:
                break
            if not 0 <= idx < physical:
                break
            key = str(idx)
        if key in seen:  # CUDA treats a repeated id as an invalid list from there on
            break
        seen.append(key)
    return min(len(seen), physical)


def _proc_gpus(proc_dir: str) -> int | None:
    try:
        return sum(1 for _ in Path(proc_dir).iterdir())
    except OSError:  # no NVIDIA kernel driver here (or no procfs: WSL2, macOS)
        return None


def _smi_gpus(timeout_s: float) -> int:
    if not shutil.which("nvidia-smi"):
        return 0
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.SubprocessError):  # hung or broken driver: no usable GPU
        return 0
    return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))


def physical_gpus(*, proc_dir: str = PROC_GPUS, env: Mapping[str, str] | None = None,
                  smi_timeout_s: float = SMI_TIMEOUT_S) -> int:
    """GPUs this host really has and this process may use (Ray happily declares GPUs that do
    not exist). From the driver's /proc entries, else `nvidia-smi -L`; never imports torch,
    so it answers in milliseconds (at most `smi_timeout_s`). Whether CUDA works on them is
    the CUDA preflight's question (raysweep.cluster.gpu.cuda_preflight)."""
    visible = (os.environ if env is None else env).get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1", "NoDevFiles"):
        return 0
    n = _proc_gpus(proc_dir)
    if n is None:
        n = _smi_gpus(smi_timeout_s)
    return visible_count(n, visible)


@dataclass(frozen=True)
class LocalPlan:
    plan: ResourcePlan
    cpus: int  # what the local Ray instance gets
    gpus: int


def plan_local(*, num_gpus: int | None, gpus_per_trial: float | str, cpus_per_trial: int,
               gpus_per_trial_explicit: bool, cpus: int | None = None, gpus: int | None = None) -> LocalPlan:
    """The plan of a sweep on a Ray instance started here, decided before Ray starts, so that
    every request this machine cannot serve (--num-gpus, --gpus-per-trial, CPUs) is refused
    first. `cpus`/`gpus` default to os.cpu_count() and physical_gpus()."""
    have = physical_gpus() if gpus is None else gpus
    if num_gpus is not None and num_gpus > have:
        raise RaysweepError(f"--num-gpus {num_gpus} asked for, but this machine has {have} GPU(s)")
    use = have if num_gpus is None else num_gpus
    cores = cpus or os.cpu_count() or 1
    plan = plan_resources(cluster_cpus=cores, cluster_gpus=use, gpus_per_trial=gpus_per_trial,
                          cpus_per_trial=cpus_per_trial, gpus_per_trial_explicit=gpus_per_trial_explicit,
                          host_cpus=cores)
    return LocalPlan(plan, cores, use)
