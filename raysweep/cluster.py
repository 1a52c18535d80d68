"""Starting or joining Ray, checking the GPUs that are really there, and sizing trials.

`plan_resources` is pure: it turns what the cluster has and what the user asked for
into per-trial resources and a concurrency limit, and refuses impossible requests.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
from dataclasses import dataclass

from raysweep.errors import RaysweepError

# CPUs kept out of trials so Ray Data tasks (the trial's input pipeline) can always run.
# A cluster whose trials hold every CPU starves Ray Data and hangs forever.
DATA_CPUS = 1


@dataclass(frozen=True)
class ResourcePlan:
    use_gpu: bool
    num_workers: int  # TorchTrainer workers per trial
    gpus_per_worker: float
    cpus_per_worker: int
    max_concurrent_trials: int
    torch_threads: int  # intra-op threads for a CPU worker (0 = leave to the loop)

    def describe(self) -> str:
        if self.use_gpu:
            per = f"{self.num_workers} GPU worker(s) x {self.gpus_per_worker:g} GPU"
        else:
            per = f"1 CPU worker ({self.cpus_per_worker} CPU, {self.torch_threads} torch threads)"
        return f"{per} per trial, up to {self.max_concurrent_trials} trial(s) at once"


def plan_resources(*, cluster_cpus: float, cluster_gpus: float, gpus_per_trial: float,
                   cpus_per_trial: int, gpus_per_trial_explicit: bool = False,
                   host_cpus: int | None = None) -> ResourcePlan:
    """Decide trial resources for a cluster with `cluster_cpus` CPUs and `cluster_gpus` GPUs.

    GPU trials get one worker per whole GPU (`gpus_per_trial` >= 1) or one worker holding a
    fraction of a GPU (`gpus_per_trial` < 1, packing small trials onto one GPU). With no GPUs
    a trial gets one CPU worker, unless the user explicitly asked for GPUs per trial.
    """
    if cluster_gpus > 0 and gpus_per_trial > 0:
        if gpus_per_trial > cluster_gpus:
            raise RaysweepError(
                f"--gpus-per-trial {gpus_per_trial:g} is more than the {cluster_gpus:g} GPU(s) available")
        if gpus_per_trial >= 1:
            workers, per_worker = int(gpus_per_trial), 1.0
        else:
            workers, per_worker = 1, float(gpus_per_trial)
        concurrent = max(1, int(math.floor(cluster_gpus / gpus_per_trial + 1e-9)))
        spare_cpus = cluster_cpus - DATA_CPUS
        by_cpu = int(spare_cpus // (workers * cpus_per_trial)) if spare_cpus > 0 else 0
        if by_cpu < 1:
            raise RaysweepError(
                f"the cluster has {cluster_cpus:g} CPU(s): a GPU trial needs {workers * cpus_per_trial} "
                f"plus {DATA_CPUS} kept free for Ray Data (sweep.cpus_per_trial)")
        return ResourcePlan(True, workers, per_worker, cpus_per_trial, min(concurrent, by_cpu), 0)
    if gpus_per_trial_explicit and gpus_per_trial > 0:
        raise RaysweepError(
            f"--gpus-per-trial {gpus_per_trial:g} asked for, but no GPU is available "
            "(pass --gpus-per-trial 0 to train on the CPU)")
    spare_cpus = cluster_cpus - DATA_CPUS
    concurrent = int(spare_cpus // cpus_per_trial)
    if concurrent < 1:
        raise RaysweepError(
            f"the cluster has {cluster_cpus:g} CPU(s): a CPU trial needs sweep.cpus_per_trial="
            f"{cpus_per_trial} plus {DATA_CPUS} kept free for Ray Data")
    # Input is loaded once at trial start, after which the CPUs kept for Ray Data sit idle,
    # so each concurrent trial's torch may use its share of the host's cores.
    cores = host_cpus or int(cluster_cpus)
    threads = max(cpus_per_trial, cores // concurrent)
    return ResourcePlan(False, 1, 0.0, cpus_per_trial, concurrent, threads)


def physical_gpus() -> int:
    """GPUs this host really has (Ray will happily declare GPUs that do not exist)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return 0
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.device_count()
    except Exception:  # a broken CUDA install is "no GPU" for sizing purposes
        pass
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
            return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))
        except (OSError, subprocess.SubprocessError):
            return 0
    return 0


def start_or_join(*, address: str | None, num_gpus: int | None, dashboard_host: str,
                  quiet: bool) -> dict:
    """Start a local Ray instance (with dashboard) or join `address`; returns what we know of it.

    The returned dict has `cpus`, `gpus`, `dashboard_url`, `max_node_cpus` and `local`
    (True if we started it).
    """
    import ray

    if address:
        have = None
    else:
        have = physical_gpus()
        if num_gpus is not None and num_gpus > have:
            raise RaysweepError(f"--num-gpus {num_gpus} asked for, but this machine has {have} GPU(s)")
    try:
        if address:
            ctx = ray.init(address=address, log_to_driver=not quiet, logging_level="WARNING")
        else:
            ctx = ray.init(num_cpus=os.cpu_count(), num_gpus=have if num_gpus is None else num_gpus,
                           include_dashboard=True, dashboard_host=dashboard_host,
                           log_to_driver=not quiet, logging_level="WARNING")
    except ConnectionError as err:
        raise RaysweepError(f"cannot reach the Ray cluster at --address {address}: {err}") from None
    res = ray.cluster_resources()
    gpus = float(res.get("GPU", 0.0))
    if address and num_gpus is not None and num_gpus > gpus:
        raise RaysweepError(f"--num-gpus {num_gpus} asked for, but the cluster at {address} has {gpus:g} GPU(s)")
    if address is None and num_gpus is not None:
        gpus = float(num_gpus)
    url = ctx.dashboard_url or ""
    if url and not url.startswith("http"):
        url = f"http://{url}"
    # A CPU trial's torch threads must fit on one node, however large the cluster.
    node_cpus = max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")), default=0)
    return {"cpus": float(res.get("CPU", 0.0)), "gpus": gpus, "dashboard_url": url,
            "local": address is None, "max_node_cpus": int(node_cpus)}
