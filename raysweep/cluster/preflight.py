"""The checks every node that trains must pass before any trial, one task per node: that it
reads the prepared cache, and (GPU sweeps) that CUDA runs there (its probe is raysweep.cluster.gpu's)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from raysweep.cluster.connect import run_on_nodes, trial_nodes
from raysweep.cluster.gpu import PROBE_GPU_SHARE, CudaReport, probe_cuda, summarize_cuda_probes
from raysweep.errors import RaysweepError


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


def cuda_preflight(*, bf16: bool, nodes: Sequence[Mapping[str, Any]] | None = None,
                   timeout_s: float = 180.0, gpu_share: float = PROBE_GPU_SHARE) -> CudaReport:
    """Run `probe_cuda` once on every GPU node (default: the alive nodes with GPUs) and
    summarise. Needs a connected Ray; run it before any trial holds a GPU."""
    if nodes is None:
        import ray

        nodes = trial_nodes(ray.nodes(), use_gpu=True)
    # A sliver of a GPU: Ray then sets CUDA_VISIBLE_DEVICES as it does for a trial's worker.
    results = run_on_nodes(probe_cuda, nodes, args=(bf16,), timeout_s=timeout_s, num_gpus=gpu_share)
    return summarize_cuda_probes(results, bf16)
