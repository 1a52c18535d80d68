"""Sweeps on a Ray cluster of real hosts: a head and two workers, each a network namespace with
its own address (tests/multihost.py), the sweep's driver joining with --address <head>:6379.

What a user with several hosts relies on, checked through what Ray itself reports (the node of
each trial's Train worker, the node each data read task ran on) and through the sweep's files:
trials train on the workers and read their data there; a host lost mid-sweep costs only the
epochs since its trial's last checkpoint; a host that cannot see the cache stops the sweep
before any trial, in one line naming that host.

Needs root and iproute2 (skipped with the reason elsewhere); `make test-multihost` runs it alone.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.multihost import NET, Hosts, RayHosts, unavailable

REPO = Path(__file__).resolve().parent.parent
WHY_NOT = unavailable(probe=False)  # collecting (make test deselects these) makes no namespace
pytestmark = [pytest.mark.multihost,
              pytest.mark.skipif(WHY_NOT is not None, reason=f"multi-host cluster: {WHY_NOT}")]


class Cluster:
    """The running test cluster and the directory every host sees (cache and results)."""

    def __init__(self, ray_hosts: RayHosts, shared: Path, nodes: dict[str, dict]):
        self.ray, self.shared = ray_hosts, shared
        self.cache = shared / "cache"
        self.host_of = {node_id: n["ip"] for node_id, n in nodes.items()}  # as ray.nodes() has them

    @property
    def workers(self) -> dict[str, str]:
        """Worker host name -> its address (every host but the head)."""
        return {h.name: h.ip for h in self.ray.hosts.hosts.values() if h is not self.ray.head}

    def sweep(self, name: str, *args: str) -> subprocess.Popen:
        """The smoke sweep's CLI as a driver on the head host, joining the cluster by address;
        its console goes to <shared>/<name>.out."""
        out = open(self.shared / f"{name}.out", "w")
        cmd = [sys.executable, "-m", "raysweep.tune", "--config", "configs/smoke.yaml",
               "--address", self.ray.address, "--storage-path", str(self.shared / "results"), "--name", name,
               "--set", f"data.cache_dir={self.cache}", *args]
        return self.ray.popen(self.ray.head, *cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)

    def console(self, name: str) -> str:
        return (self.shared / f"{name}.out").read_text()

    def experiment(self, name: str) -> Path:
        return self.shared / "results" / name


@pytest.fixture(scope="module")
def cluster():
    why_not = unavailable(probe=True)
    if why_not:
        pytest.skip(f"multi-host cluster: {why_not}")
    shared = Path(tempfile.mkdtemp(prefix="rsmh-", dir="/tmp"))
    # Every host and the driver: token auth (conftest's token), this checkout on the path (the
    # workers import raysweep as the driver does), Ray's raylet settings as conftest's cluster.
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", "RAY_worker_niceness": "0",
           "RAY_worker_maximum_startup_concurrency": "8", "RAY_num_workers_soft_limit": "12"}
    hosts = Hosts()
    try:
        ray_hosts = RayHosts(hosts, env, shared / "ray")
        ray_hosts.start_head()
        ray_hosts.add_workers(["w1", "w2"])
        nodes = ray_hosts.nodes(expect=3)
        assert sorted(n["ip"] for n in nodes.values() if n["alive"]) == [f"{NET}.1", f"{NET}.2", f"{NET}.3"], nodes
        yield Cluster(ray_hosts, shared, nodes)
    finally:
        hosts.close()
        left = hosts.names()
        shutil.rmtree(shared, ignore_errors=True)
        assert not left, f"namespaces left behind: {left}"


def result_rows(trial_dir: Path) -> list[dict]:
    return [json.loads(ln) for ln in (trial_dir / "result.json").read_text().splitlines() if ln.strip()]


def trials(exp: Path) -> dict[str, list[dict]]:
    """Trial directory name -> its epoch rows (result.json: one line per epoch)."""
    return {p.parent.name: result_rows(p.parent) for p in sorted(exp.glob("*/result.json"))}


def wait(proc: subprocess.Popen, timeout: float) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise


def test_trials_train_on_the_workers_and_read_their_data_there(cluster):
    proc = cluster.sweep("placed")
    rc = wait(proc, 480)
    out = cluster.console("placed")
    assert rc == 0, out[-4000:]
    exp = cluster.experiment("placed")
    by_trial = trials(exp)
    assert len(by_trial) == 4, out[-3000:]
    worker_ips = set(cluster.workers.values())
    hosts_used = set()
    for name, rows in by_trial.items():
        assert [r["epoch"] for r in rows] == [1, 2], name  # every epoch once
        # The Train worker's node, as Ray names it, mapped to its host by ray.nodes(). (Tune's
        # own `node_ip` in a result is where the trial's Tune actor ran: any host, the head too.)
        node = {r["node_id"] for r in rows}
        assert len(node) == 1, (name, node)
        host = cluster.host_of[next(iter(node))]
        assert host in worker_ips, (name, host)  # a worker, never the head
        hosts_used.add(host)
        # Every read task of the trial's splits ran on the node its Train worker ran on.
        assert {r["data_node_ids"] for r in rows} == node, (name, rows[0]["data_node_ids"], node)
    # Two trials at a time, each holding a worker's only CPU: both workers trained.
    assert hosts_used == worker_ips, hosts_used

    import pandas as pd

    summary = pd.read_csv(exp / "summary.csv")
    assert len(summary) == 4 and set(summary["status"]) == {"TERMINATED"}
    for col in ["fraction", "seed", "n_train", "best_epoch", "val_top1_error", "test_top1_error", "wall_time_s"]:
        assert summary[col].notna().all(), col


def _own_metrics(rows: list[dict]) -> list[dict]:
    """A trial's rows without Tune's bookkeeping (timestamps, pid, iteration counters)."""
    tune_keys = {"timestamp", "date", "time_this_iter_s", "time_total_s", "pid", "hostname", "node_ip",
                 "time_since_restore", "iterations_since_restore", "training_iteration", "done", "config"}
    return [{k: v for k, v in r.items() if k not in tune_keys} for r in rows]


def _finished(rows: list[dict]) -> bool:
    return any("test_top1_error" in r for r in rows)


def test_a_host_lost_mid_sweep_costs_only_the_epochs_since_its_checkpoint(cluster):
    every, epochs, name = 2, 16, "lost"
    # Three trials, two at a time: the kill waits for one to have ended, then lands on the host
    # of one still training past a checkpoint.
    proc = cluster.sweep(name, "--fractions", "1", "0.25", "0.5", "--seeds", "0", "--epochs", str(epochs),
                         "--set", f"sweep.checkpoint_every={every}", "--set", "sweep.max_failures=2")
    exp = cluster.experiment(name)
    victim = None
    try:
        deadline = time.time() + 480
        while victim is None and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
            try:
                now = trials(exp)
            except (OSError, ValueError):  # a line being written
                continue
            done = {t: rows for t, rows in now.items() if _finished(rows)}
            for t, rows in now.items():
                if done and t not in done and any(r.get("checkpointed") for r in rows) \
                        and rows[-1]["epoch"] <= epochs - 3:
                    victim, before, finished_before = t, rows, {d: _own_metrics(r) for d, r in done.items()}
                    break
        assert victim is not None, "no trial was caught training past a checkpoint after another ended"
        lost = cluster.host_of[before[-1]["node_id"]]
        lost_name = next(n for n, ip in cluster.workers.items() if ip == lost)
        assert cluster.ray.hosts.kill(lost_name)  # every process of that host, SIGKILL
        t_kill = time.time()
        rc = wait(proc, 480)
    finally:
        if proc.poll() is None:
            proc.kill()
        print(cluster.console(name))  # shown by pytest when the test fails
    out = cluster.console(name)
    assert rc == 0, out[-4000:]
    after = trials(exp)
    rows = after[victim]
    assert [r["epoch"] for r in rows] == list(range(1, epochs + 1))  # every epoch once, none lost
    assert _finished(rows) and rows[-1]["node_id"] != before[-1]["node_id"]
    other = cluster.host_of[rows[-1]["node_id"]]
    assert other in cluster.workers.values() and other != lost
    # The attempt on the other worker started from the last checkpoint the lost host had
    # registered with Train, not from scratch, and read its data on its own node.
    resumed = [r for r in rows if cluster.host_of[r["node_id"]] == other]
    r = resumed[0]["resumed_from_epoch"]
    on_lost = [x["epoch"] for x in rows if cluster.host_of[x["node_id"]] == lost]
    c_seen = max(x["epoch"] for x in before if x.get("checkpointed"))
    assert r >= c_seen and r % every == 0 and r >= every, (r, c_seen)
    assert {x["resumed_from_epoch"] for x in resumed} == {r}
    assert {x["data_node_ids"] for x in resumed} == {resumed[0]["node_id"]}
    # Epochs run twice: those the lost host had finished past that checkpoint (its rows that
    # reached Tune: before the kill, or in flight then), plus the one it was training when it
    # died. The cadence bounds the first. (A retry by Tune rewrites the trial's files from the
    # checkpoint's replay, so the rows seen before the kill count too.)
    k = max(on_lost + [before[-1]["epoch"]])
    rerun = k - r
    assert 0 <= rerun < every, (k, r)
    print(f"host loss: killed {lost_name} ({lost}) while trial {victim} trained its epoch {k + 1} (last "
          f"checkpoint: epoch {r}, every {every}); resumed on {other} from epoch {r + 1}: {rerun} finished "
          f"epoch(s) re-run, plus the interrupted one; the sweep ended {time.time() - t_kill:.0f} s after the kill")
    # No trial that had finished was trained again: its rows are exactly as they were.
    for t, metrics in finished_before.items():
        assert _own_metrics(after[t]) == metrics, t
    # Every trial ended, each epoch once, and the console said which trial was retried.
    assert len(after) == 3 and all(_finished(x) and [e["epoch"] for e in x] == list(range(1, epochs + 1))
                                   for x in after.values())
    import pandas as pd

    summary = pd.read_csv(exp / "summary.csv")
    assert len(summary) == 3 and set(summary["status"]) == {"TERMINATED"}, summary
    fraction = float(re.search(r"fraction=([0-9.]+)", victim).group(1))
    retries = [ln for ln in out.splitlines() if " retry " in ln]
    assert retries and all(f"fraction {fraction:<7g}" in ln for ln in retries), (victim, retries)
    print("retry line:", retries[0])


def test_a_host_that_cannot_read_the_cache_stops_the_sweep_before_any_trial(cluster):
    # The cache exists (an earlier test, or this sweep's driver, prepared it); a third worker
    # sees an empty directory where the others see it: it mounts no shared storage there.
    if not list(cluster.cache.glob("prepared/*/meta.json")):
        prepare = cluster.ray.popen(cluster.ray.head, sys.executable, "-m", "raysweep.prepare", "--config",
                                    "configs/smoke.yaml", "--address", cluster.ray.address, "--quiet",
                                    "--cache-dir", str(cluster.cache), cwd=REPO, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True)
        assert wait(prepare, 150) == 0, prepare.stdout.read()
    blind = cluster.ray.add_worker("w3", hide=str(cluster.cache))
    t0 = time.time()
    proc = cluster.sweep("blind")
    rc = wait(proc, 150)
    out = cluster.console("blind")
    assert rc == 2, out[-3000:]
    lines = [ln for ln in out.splitlines() if ln.startswith("raysweep: error") or "cannot read the prepared" in ln]
    assert len(lines) == 1, out[-3000:]
    assert f"node {blind.ip} (" in lines[0] and str(cluster.cache) in lines[0] and "no such file" in lines[0]
    assert "Traceback" not in out and " start " not in out  # one line, and no trial started
    assert not list(cluster.experiment("blind").glob("*/result.json"))
    print(f"preflight ({time.time() - t0:.0f} s): {lines[0]}")
