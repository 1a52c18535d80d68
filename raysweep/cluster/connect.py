"""Starting or joining Ray, and running one task on each node (the preflights use it)."""

from __future__ import annotations

import os
from typing import Any, Callable, Mapping, Sequence

from raysweep.cluster.resources import physical_gpus
from raysweep.errors import RaysweepError


def start_or_join(*, address: str | None, num_gpus: int | None, dashboard_host: str,
                  quiet: bool, dashboard: bool = True) -> dict:
    """Start a local Ray instance (with its dashboard unless `dashboard` is False) or join
    `address`; returns what we know of it.

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
                           include_dashboard=dashboard, dashboard_host=dashboard_host,
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
