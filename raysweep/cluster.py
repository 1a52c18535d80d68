"""Starting or joining Ray, counting the GPUs that are really there, sizing trials, and the
checks every node that trains must pass (its preflights run here, one task per node).

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
            per = f"1 CPU worker ({self.cpus_per_worker} CPU, {self.torch_threads} torch threads)"
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
                   trial_bytes: Mapping[float, int] | None = None, max_trials: int = 0) -> ResourcePlan:
    """Decide trial resources for a cluster with `cluster_cpus` CPUs and `cluster_gpus` GPUs.

    A number: GPU trials get one worker per whole GPU (>= 1) or one worker holding that share
    of a GPU (< 1) for every fraction. "auto": one worker per trial, its share by fraction from
    `raysweep.gpu.auto_gpu_shares(trial_bytes, gpu_memory_bytes)` (trial_bytes: fraction ->
    its splits plus reserve, in bytes); without those yet, one GPU each. With no GPUs a trial
    gets one CPU worker, unless the user explicitly asked for GPUs per trial. `max_trials` (> 0)
    caps the trials at once (sweep.max_concurrent_trials); CPU threads are shared among those.
    """
    cap = max_trials if max_trials > 0 else math.inf
    auto = gpus_per_trial == "auto"
    wants_gpu = auto or float(gpus_per_trial) > 0
    if cluster_gpus > 0 and wants_gpu:
        shares: dict[float, float] = {}
        if auto:
            workers, per_worker = 1, 1.0
            if gpu_memory_bytes and trial_bytes:
                from raysweep.gpu import auto_gpu_shares

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
    concurrent = int(cluster_cpus // cpus_per_trial)
    if concurrent < 1:
        raise RaysweepError(
            f"the cluster has {cluster_cpus:g} CPU(s): a CPU trial needs sweep.cpus_per_trial={cpus_per_trial}")
    concurrent = int(min(concurrent, cap))
    cores = host_cpus or int(cluster_cpus)
    threads = max(cpus_per_trial, cores // concurrent)
    return ResourcePlan(False, 1, 0.0, cpus_per_trial, concurrent, threads)


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
    the CUDA preflight's question (raysweep.gpu.cuda_preflight)."""
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


# --- Ray: start or join, and one task per node ------------------------------------------

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


def trial_nodes(nodes: Sequence[Mapping[str, Any]], use_gpu: bool) -> list[Mapping[str, Any]]:
    """The alive nodes where trials can run: those with GPUs for a GPU sweep, else with CPUs
    (a head started with --num-cpus=0 --num-gpus=0 runs none). `nodes` as from ray.nodes()."""
    key = "GPU" if use_gpu else "CPU"
    return [n for n in nodes if n.get("Alive") and n.get("Resources", {}).get(key, 0) > 0]


def node_label(node: Mapping[str, Any]) -> str:
    """`10.0.0.5 (a1b2c3d4)`: the address people know, and the id that tells apart nodes sharing it."""
    return f"{node.get('NodeManagerAddress', '?')} ({str(node.get('NodeID', ''))[:8]})"


def run_on_nodes(fn: Callable[..., dict], nodes: Sequence[Mapping[str, Any]], *, args: tuple = (),
                 timeout_s: float = 120.0, num_gpus: float = 0) -> list[dict]:
    """Run `fn(*args)` once on each node (pinned there) and return its dicts, each with "node".

    The tasks hold no CPU (and `num_gpus`, a sliver at most, so that Ray shows them a GPU as it
    shows a trial one); each runs in a worker process that exits afterwards (max_calls=1), so a
    probe that touched CUDA leaves no context behind on the GPU. A node that fails or does not
    answer in `timeout_s` becomes an {"ok": False} result naming why.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    task = ray.remote(num_cpus=0, num_gpus=num_gpus, max_calls=1)(fn)
    refs = [task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(str(n["NodeID"]), soft=False))
            .remote(*args) for n in nodes]
    _, pending = ray.wait(refs, num_returns=len(refs), timeout=timeout_s) if refs else ([], [])
    results = []
    for node, ref in zip(nodes, refs):
        if ref in pending:
            ray.cancel(ref, force=True)
            out = {"ok": False, "reason": f"no answer within {timeout_s:g} s",
                   "fix": "check the node in the Ray dashboard (is it alive? are all its GPUs taken?)"}
        else:
            try:
                out = dict(ray.get(ref))
            except Exception as err:  # the node died, or the task could not even start there
                msg = (str(err).strip().splitlines() or [type(err).__name__])[-1]
                out = {"ok": False, "reason": f"the check could not run there: {msg}",
                       "fix": "check the node in the Ray dashboard"}
        out["node"] = node_label(node)
        results.append(out)
    return results


# --- the prepared cache on every node that trains ---------------------------------------

def probe_cache(meta_path: str) -> dict:
    """On this node: can the prepared cache's meta.json be read (and parsed)?"""
    import json

    try:
        with open(meta_path) as f:
            json.load(f)
    except FileNotFoundError:
        return {"ok": False, "reason": "no such file"}
    except (OSError, ValueError) as err:
        return {"ok": False, "reason": f"cannot be read: {err}"}
    return {"ok": True, "reason": ""}


def check_cache_results(results: Sequence[Mapping[str, Any]], meta_path: str) -> None:
    """Raise one line naming the first node that cannot read the cache, and the path."""
    bad = [r for r in results if not r.get("ok")]
    if not bad:
        return
    more = f" (and {len(bad) - 1} more node(s))" if len(bad) > 1 else ""
    raise RaysweepError(
        f"node {bad[0].get('node', '?')} cannot read the prepared cache {meta_path}: {bad[0].get('reason')}{more}; "
        "put data.cache_dir on storage every training node mounts at the same path")


def check_cache_on_nodes(cache_path: str | os.PathLike, *, use_gpu: bool,
                         nodes: Sequence[Mapping[str, Any]] | None = None,
                         probe: Callable[[str], dict] = probe_cache, timeout_s: float = 60.0) -> int:
    """Check that every node that can run trials reads `<cache_path>/meta.json`; returns how
    many nodes were checked. Needs a connected Ray. `probe` runs on each node (tests swap it)."""
    meta = str(Path(cache_path) / "meta.json")
    if nodes is None:
        import ray

        nodes = trial_nodes(ray.nodes(), use_gpu)
    check_cache_results(run_on_nodes(probe, nodes, args=(meta,), timeout_s=timeout_s), meta)
    return len(nodes)
