"""Trial sizing, GPU counting without torch, refusals before Ray, and the per-node cache check."""

import os
import stat
import subprocess
import sys
import time

import pytest

from conftest import REPO
from raysweep.cluster.connect import node_label, trial_nodes
from raysweep.cluster.preflight import check_cache_on_nodes, check_cache_results
from raysweep.cluster.resources import physical_gpus, plan_local, plan_resources, visible_count
from raysweep.errors import RaysweepError

GIB = 1024**3


def test_cpu_only_machine_trains_a_trial_on_every_core():
    # CPU trials read their data with tasks that hold no CPU, so none is kept back for Ray Data.
    plan = plan_resources(cluster_cpus=2, cluster_gpus=0, gpus_per_trial=1, cpus_per_trial=1, host_cpus=2)
    assert not plan.use_gpu and plan.num_workers == 1 and plan.cpus_per_worker == 1
    assert plan.max_concurrent_trials == 2
    assert plan.torch_threads == 1  # two trials side by side, one core each
    assert plan.gpu_share(0.5) == 0.0
    alone = plan_resources(cluster_cpus=2, cluster_gpus=0, gpus_per_trial=0, cpus_per_trial=2, host_cpus=2)
    assert alone.max_concurrent_trials == 1 and alone.torch_threads == 2


def test_the_users_trial_cap_shares_the_cores_among_the_trials_it_allows():
    # sweep.max_concurrent_trials=2 on 16 cores: two trials, 8 threads each (not 16 trials' 1).
    plan = plan_resources(cluster_cpus=16, cluster_gpus=0, gpus_per_trial=0, cpus_per_trial=1, host_cpus=16,
                          max_trials=2)
    assert (plan.max_concurrent_trials, plan.torch_threads) == (2, 8)
    gpu = plan_resources(cluster_cpus=32, cluster_gpus=4, gpus_per_trial=0.25, cpus_per_trial=1, max_trials=3)
    assert gpu.max_concurrent_trials == 3  # 16 quarter-GPU trials would fit
    uncapped = plan_resources(cluster_cpus=16, cluster_gpus=0, gpus_per_trial=0, cpus_per_trial=1, host_cpus=16)
    assert (uncapped.max_concurrent_trials, uncapped.torch_threads) == (16, 1)


def test_cpu_concurrency_follows_cpus():
    plan = plan_resources(cluster_cpus=16, cluster_gpus=0, gpus_per_trial=0, cpus_per_trial=4, host_cpus=16)
    assert plan.max_concurrent_trials == 16 // 4 == 4
    assert plan.torch_threads == 16 // 4


@pytest.mark.parametrize("gpus,per_trial,workers,per_worker,concurrent", [
    (4, 1, 1, 1.0, 4),
    (4, 2, 2, 1.0, 2),
    (1, 0.5, 1, 0.5, 2),
    (8, 0.25, 1, 0.25, 32),
])
def test_explicit_gpus_per_trial_keeps_its_meaning(gpus, per_trial, workers, per_worker, concurrent):
    plan = plan_resources(cluster_cpus=64, cluster_gpus=gpus, gpus_per_trial=per_trial, cpus_per_trial=1,
                          gpu_memory_bytes=80 * GIB, trial_bytes={1.0: 5 * GIB, 0.0625: GIB})
    assert plan.use_gpu and not plan.auto
    assert (plan.num_workers, plan.gpus_per_worker, plan.max_concurrent_trials) == (workers, per_worker, concurrent)
    # Every fraction gets the asked share, whatever memory says.
    assert plan.gpu_share(1.0) == plan.gpu_share(0.0625) == per_worker


def test_auto_shares_follow_fractions_and_bound_concurrency():
    # An 80 GB card: fraction 1 (10 GB + reserve) gets a GPU, 1/2 half of one, 1/16 a quarter.
    need = {1.0: 12 * GIB, 0.5: 8 * GIB, 0.0625: 5 * GIB}
    plan = plan_resources(cluster_cpus=64, cluster_gpus=4, gpus_per_trial="auto", cpus_per_trial=1,
                          gpu_memory_bytes=80 * GIB, trial_bytes=need)
    assert plan.auto and plan.use_gpu and plan.num_workers == 1
    assert (plan.gpu_share(1.0), plan.gpu_share(0.5), plan.gpu_share(0.0625)) == (1.0, 0.5, 0.25)
    assert plan.max_concurrent_trials == 16  # 4 GPUs x 4 quarter-GPU trials
    assert "0.0625: 0.25" in plan.describe()
    # CPUs still bound it: 5 CPUs leave 4 for trials.
    small = plan_resources(cluster_cpus=5, cluster_gpus=4, gpus_per_trial="auto", cpus_per_trial=1,
                           gpu_memory_bytes=80 * GIB, trial_bytes=need)
    assert small.max_concurrent_trials == 4


def test_auto_before_memory_is_known_gives_whole_gpus_and_without_gpus_trains_on_cpu():
    plan = plan_resources(cluster_cpus=16, cluster_gpus=2, gpus_per_trial="auto", cpus_per_trial=1)
    assert plan.use_gpu and plan.gpu_share(0.0625) == 1.0 and plan.max_concurrent_trials == 2
    # "auto" is never a request for GPUs: a CPU machine trains on its CPUs, even when typed.
    cpu = plan_resources(cluster_cpus=2, cluster_gpus=0, gpus_per_trial="auto", cpus_per_trial=1,
                         gpus_per_trial_explicit=True)
    assert not cpu.use_gpu


def test_gpu_concurrency_is_capped_by_cpus_left_for_data():
    plan = plan_resources(cluster_cpus=3, cluster_gpus=4, gpus_per_trial=1, cpus_per_trial=1)
    assert plan.max_concurrent_trials == 2


def test_more_gpus_per_trial_than_present_is_refused():
    with pytest.raises(RaysweepError, match="--gpus-per-trial 8 is more than the 4 GPU"):
        plan_resources(cluster_cpus=64, cluster_gpus=4, gpus_per_trial=8, cpus_per_trial=1)


def test_explicit_gpus_without_gpus_is_refused_but_the_default_falls_back_to_cpu():
    with pytest.raises(RaysweepError, match="no GPU is available"):
        plan_resources(cluster_cpus=2, cluster_gpus=0, gpus_per_trial=1, cpus_per_trial=1,
                       gpus_per_trial_explicit=True)
    assert not plan_resources(cluster_cpus=2, cluster_gpus=0, gpus_per_trial=1, cpus_per_trial=1).use_gpu


def test_a_cluster_too_small_for_one_trial_is_refused():
    with pytest.raises(RaysweepError, match="sweep.cpus_per_trial"):
        plan_resources(cluster_cpus=1, cluster_gpus=0, gpus_per_trial=0, cpus_per_trial=2)
    # A GPU trial still keeps a CPU free for its Ray Data pipeline beside its worker.
    with pytest.raises(RaysweepError, match="kept free for Ray Data"):
        plan_resources(cluster_cpus=1, cluster_gpus=1, gpus_per_trial=1, cpus_per_trial=1)


# --- counting GPUs ----------------------------------------------------------------------

@pytest.mark.parametrize("visible,expect", [
    (None, 4), ("0,1", 2), ("3", 1), ("1,7,2", 1),  # CUDA stops at the first out-of-range id
    ("0,0", 1), ("0,x,1", 1), ("GPU-aaaa,GPU-bbbb", 2), ("MIG-1,MIG-2,MIG-3,MIG-4,MIG-5", 4),
])
def test_visible_count_reads_cuda_visible_devices_as_cuda_does(visible, expect):
    assert visible_count(4, visible) == expect


def _fake_proc(tmp_path, n):
    d = tmp_path / "gpus"
    d.mkdir()
    for i in range(n):
        (d / f"0000:{i:02x}:00.0").mkdir()
    return str(d)


def test_physical_gpus_counts_driver_entries_and_honours_cuda_visible_devices(tmp_path):
    proc = _fake_proc(tmp_path, 4)
    assert physical_gpus(proc_dir=proc, env={}) == 4
    assert physical_gpus(proc_dir=proc, env={"CUDA_VISIBLE_DEVICES": "2,3"}) == 2
    for hidden in ("", "-1", "NoDevFiles"):
        assert physical_gpus(proc_dir=proc, env={"CUDA_VISIBLE_DEVICES": hidden}) == 0


def _fake_smi(tmp_path, monkeypatch, body):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text(f"#!/bin/sh\n{body}\n")
    smi.chmod(smi.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


def test_without_driver_entries_nvidia_smi_counts_whole_gpus_only(tmp_path, monkeypatch):
    _fake_smi(tmp_path, monkeypatch, "echo 'GPU 0: NVIDIA A100-SXM4-80GB (UUID: GPU-1)'\n"
                                     "echo '  MIG 3g.40gb     Device  0: (UUID: MIG-1)'\n"
                                     "echo 'GPU 1: NVIDIA A100-SXM4-80GB (UUID: GPU-2)'")
    assert physical_gpus(proc_dir=str(tmp_path / "absent"), env={}) == 2


def test_a_hung_nvidia_smi_counts_as_no_gpu_within_its_timeout(tmp_path, monkeypatch):
    _fake_smi(tmp_path, monkeypatch, "sleep 5; echo 'GPU 0: hung'")
    t0 = time.monotonic()
    assert physical_gpus(proc_dir=str(tmp_path / "absent"), env={}, smi_timeout_s=0.5) == 0
    # Generous bound (a loaded shared machine) that a 5 s hang would still fail.
    assert time.monotonic() - t0 < 3.0


def test_gpu_refusals_come_before_ray_within_3s_and_import_neither_torch_nor_ray():
    """`--num-gpus 4` / `--gpus-per-trial 1` on this GPU-less machine: refused by plan_local in a
    fresh interpreter (as the CLI runs it), without torch or Ray ever imported."""
    code = (
        "import sys, time\n"
        "t0 = time.monotonic()\n"
        "from raysweep.cluster.resources import plan_local\n"
        "from raysweep.errors import RaysweepError\n"
        "msgs = []\n"
        "for kw in ({'num_gpus': 4, 'gpus_per_trial': 'auto', 'gpus_per_trial_explicit': False},\n"
        "           {'num_gpus': None, 'gpus_per_trial': 1.0, 'gpus_per_trial_explicit': True}):\n"
        "    try:\n"
        "        plan_local(cpus_per_trial=1, **kw)\n"
        "    except RaysweepError as e:\n"
        "        msgs.append(str(e))\n"
        "print(time.monotonic() - t0)\n"
        "print(msgs[0]); print(msgs[1])\n"
        "print('torch' in sys.modules, 'ray' in sys.modules)\n")
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    if physical_gpus() > 0:
        pytest.skip("this machine has GPUs: the refusals under test need a GPU-less host")
    elapsed, num_gpus_msg, per_trial_msg, imported = out.stdout.strip().splitlines()
    assert num_gpus_msg == "--num-gpus 4 asked for, but this machine has 0 GPU(s)"
    assert per_trial_msg.startswith("--gpus-per-trial 1 asked for, but no GPU is available")
    assert imported == "False False"
    assert float(elapsed) < 3.0  # the bound, import of raysweep included


def test_plan_local_uses_this_machines_cpus_and_the_gpus_given():
    lp = plan_local(num_gpus=None, gpus_per_trial="auto", cpus_per_trial=1, gpus_per_trial_explicit=False,
                    cpus=16, gpus=2)
    assert (lp.cpus, lp.gpus, lp.plan.use_gpu, lp.plan.max_concurrent_trials) == (16, 2, True, 2)
    lp = plan_local(num_gpus=0, gpus_per_trial="auto", cpus_per_trial=1, gpus_per_trial_explicit=False,
                    cpus=4, gpus=2)
    assert not lp.plan.use_gpu and lp.gpus == 0


# --- nodes and the prepared cache -------------------------------------------------------

NODES = [
    {"NodeID": "aaaa1111ffff", "Alive": True, "NodeManagerAddress": "10.0.0.1", "Resources": {"CPU": 0.0}},
    {"NodeID": "bbbb2222ffff", "Alive": True, "NodeManagerAddress": "10.0.0.2", "Resources": {"CPU": 8.0, "GPU": 4.0}},
    {"NodeID": "cccc3333ffff", "Alive": False, "NodeManagerAddress": "10.0.0.3", "Resources": {"CPU": 8.0, "GPU": 4.0}},
    {"NodeID": "dddd4444ffff", "Alive": True, "NodeManagerAddress": "10.0.0.4", "Resources": {"CPU": 8.0}},
]


def test_trial_nodes_are_the_alive_nodes_with_the_resource_trials_use():
    assert [node_label(n) for n in trial_nodes(NODES, use_gpu=True)] == ["10.0.0.2 (bbbb2222)"]
    assert [node_label(n) for n in trial_nodes(NODES, use_gpu=False)] == ["10.0.0.2 (bbbb2222)", "10.0.0.4 (dddd4444)"]


def test_cache_results_name_the_first_failing_node_and_the_path_in_one_line():
    results = [{"node": "10.0.0.2 (bbbb2222)", "ok": True},
               {"node": "10.0.0.4 (dddd4444)", "ok": False, "reason": "no such file"},
               {"node": "10.0.0.5 (eeee5555)", "ok": False, "reason": "no such file"}]
    with pytest.raises(RaysweepError) as err:
        check_cache_results(results, "/cache/prepared/x/meta.json")
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith("node 10.0.0.4 (dddd4444) cannot read the prepared cache /cache/prepared/x/meta.json")
    assert "(and 1 more node(s))" in msg and "data.cache_dir" in msg
    check_cache_results(results[:1], "/x/meta.json")  # all readable: no error


@pytest.mark.slow
def test_a_node_that_cannot_see_the_cache_is_one_line_naming_it(ray_session, tmp_path):
    """Through the session cluster (head + worker, both with CPUs): the real probe runs pinned
    on each node; on the worker, it is pointed at a path that is not there, as on a host that
    does not mount the cache."""
    ray = ray_session
    cache = tmp_path / "prepared"
    cache.mkdir()
    (cache / "meta.json").write_text('{"version": 1}')
    nodes = trial_nodes(ray.nodes(), use_gpu=False)
    assert len(nodes) == 2
    assert check_cache_on_nodes(cache, use_gpu=False) == 2  # both nodes read it

    worker = next(n for n in nodes if "node:__internal_head__" not in n["Resources"])
    hidden = worker["NodeID"]

    def probe_without_mount(meta_path):
        import ray as _ray

        from raysweep.cluster.preflight import probe_cache

        here = _ray.get_runtime_context().get_node_id()
        return probe_cache(meta_path + ".unmounted" if here == hidden else meta_path)

    with pytest.raises(RaysweepError) as err:
        check_cache_on_nodes(cache, use_gpu=False, probe=probe_without_mount)
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith(f"node {node_label(worker)} cannot read the prepared cache {cache / 'meta.json'}: no such file")
    assert "more node" not in msg  # the head reads it: only the worker is named


@pytest.mark.parametrize("dashboard", [True, False])
def test_a_local_ray_starts_with_its_dashboard_unless_told_not_to(monkeypatch, dashboard):
    """start_or_join hands Ray's own include_dashboard switch the --no-dashboard choice (ray.init
    is replaced: no second Ray starts beside the session's)."""
    import ray

    asked = {}

    def fake_init(**kwargs):
        asked.update(kwargs)
        return type("Ctx", (), {"dashboard_url": "127.0.0.1:8265" if kwargs["include_dashboard"] else ""})()

    monkeypatch.setattr(ray, "init", fake_init)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True, "Resources": {"CPU": 2.0}}])
    from raysweep.cluster.connect import start_or_join

    info = start_or_join(address=None, num_gpus=0, dashboard_host="127.0.0.1", quiet=True, dashboard=dashboard)
    assert asked["include_dashboard"] is dashboard
    assert info["dashboard_url"] == ("http://127.0.0.1:8265" if dashboard else "")
