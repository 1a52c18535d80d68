"""Shared fixtures.

Every test that needs Ray uses the one session-scoped cluster below. It is laid out as
the docker-compose cluster is: a head and a worker started as separate processes with
`ray start`, token authentication on, both on 127.0.0.1. In-process tests connect with
`ray.init(address=...)`; CLI tests pass `--address`.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# Token auth for the session cluster, set before anything imports ray: Ray reads the mode
# once per process, so a test that imports ray first would otherwise fix it to "disabled".
os.environ["RAY_AUTH_MODE"] = "token"
os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(16)
# No Ray Data usage poller in the test process: it queries Prometheus every 10 s from a daemon
# thread, and one caught by the end of the session printed a traceback after pytest's summary.
os.environ.setdefault("RAY_DATA_USAGE_DISABLED", "1")
RAY = str(Path(sys.executable).parent / "ray")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray(*args: str, env: dict[str, str]) -> None:
    proc = subprocess.run([RAY, *args], env=env, capture_output=True, text=True, timeout=180)
    if proc.returncode != 0:
        raise RuntimeError(f"`ray {' '.join(args)}` failed:\n{proc.stdout}\n{proc.stderr}")


def _processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) for every process we can see."""
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        out[int(d.name)] = (ppid, cmd)
    return out


def _stop_cluster(started: set[int], markers: tuple[str, ...]) -> None:
    """Kill this cluster's processes only (not `ray stop`, which kills every cluster on the host)."""
    procs = _processes()
    ours = set(started) | {pid for pid, (_, cmd) in procs.items() if any(m in cmd for m in markers)}
    grew = True
    while grew:  # add descendants (workers, agents) of anything already ours
        new = {pid for pid, (ppid, _) in procs.items() if ppid in ours} - ours
        grew = bool(new)
        ours |= new
    ours.discard(os.getpid())
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in ours:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + 10
        while time.time() < deadline and any(Path(f"/proc/{p}").exists() and "(Z)" not in _state(p) for p in ours):
            time.sleep(0.2)


def _state(pid: int) -> str:
    try:
        return "(" + Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] + ")"
    except (OSError, IndexError):
        return "(Z)"


@pytest.fixture(scope="session")
def ray_cluster():
    """A head and a worker node on 127.0.0.1 (1 CPU each), as in docker-compose.

    Yields the GCS address. The auth token is shared through the environment, as the
    containers share it, so child processes (the CLIs under test) inherit it.
    """
    tmp = Path(tempfile.mkdtemp(prefix="rs-ray-", dir="/tmp"))
    # The one raylet setting raysweep gives a cluster it starts itself (raysweep.sweep.ray_compat):
    # no console warning when a trial's actors start together.
    env = {**os.environ, "RAY_worker_maximum_startup_concurrency": "8"}
    port = _free_port()
    address = f"127.0.0.1:{port}"
    before = set(_processes())
    started: set[int] = set()
    # What names this cluster's processes: its temp dir, or its GCS port behind any host
    # (Ray's client server names the node's own IP, not 127.0.0.1).
    markers = (str(tmp), address, f":{port} ")
    common = ["--node-ip-address=127.0.0.1", "--num-cpus=1", "--num-gpus=0",
              "--object-store-memory=1500000000", "--disable-usage-stats"]
    try:
        # With its dashboard, as a sweep's own cluster and the compose head have it: Ray Train's
        # stock placement-group cleaner asks the dashboard's State API whether a dead trial's
        # controller lives, and without it the trial's placement group (and its CPUs) leaked, so
        # a later trial waited for them for ever.
        _ray("start", "--head", f"--port={port}", f"--temp-dir={tmp}", "--include-dashboard=true",
             f"--dashboard-port={_free_port()}", f"--ray-client-server-port={_free_port()}",
             *common, env=env)
        _ray("start", f"--address={address}", *common, env=env)
        # Only this cluster's new processes: other sessions on the host start processes too.
        started = {pid for pid, (_, cmd) in _processes().items()
                   if pid not in before and any(m in cmd for m in markers)}
        yield address
    finally:
        try:
            import ray

            if ray.is_initialized():
                ray.shutdown()
        except Exception:
            pass
        # Anything new since before the start that carries our markers, plus descendants.
        _stop_cluster(started, markers)
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_session(ray_cluster):
    """This process connected as a driver to the session cluster."""
    import ray

    if not ray.is_initialized():
        ray.init(address=ray_cluster, log_to_driver=False)
    deadline = time.time() + 60
    while ray.cluster_resources().get("CPU", 0) < 2 and time.time() < deadline:
        time.sleep(0.5)
    yield ray


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory) -> Path:
    """A small learnable synthetic set in the hub's exact layout and schema."""
    from raysweep.data.synthetic import write_synthetic

    out = tmp_path_factory.mktemp("synthetic")
    write_synthetic(out, classes=4, train_per_class=12, val_per_class=4, test_per_class=4, seed=0)
    return out


def run_cli(*args: str, timeout: float = 900, check: bool = True) -> subprocess.CompletedProcess:
    """Run `python -m <args>` from the repo root with this interpreter; returns the process."""
    proc = subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if check and proc.returncode != 0:
        raise AssertionError(f"`python -m {' '.join(args)}` exited {proc.returncode}\n"
                             f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}")
    return proc


@pytest.fixture(scope="session")
def smoke_experiment(ray_cluster, tmp_path_factory) -> Path:
    """The smoke sweep (configs/smoke.yaml: 2 fractions x 2 seeds x 2 epochs), run through the
    CLI at its default verbosity against the session cluster it did not start; returns the
    experiment directory. Its console output is kept beside it (cli_stdout.txt, cli_stderr.txt),
    and, where MLflow is installed, it logs to the MLflow store `mlruns` beside it too."""
    root = tmp_path_factory.mktemp("smoke")
    import importlib.util

    mlflow = ["--mlflow", f"file:{root / 'mlruns'}"] if importlib.util.find_spec("mlflow") else []
    proc = run_cli("raysweep.tune", "--config", "configs/smoke.yaml", "--address", ray_cluster,
                   "--storage-path", str(root), "--name", "smoke", *mlflow,
                   "--set", f"data.cache_dir={root / 'cache'}")
    exp = root / "smoke"
    (root / "cli_stdout.txt").write_text(proc.stdout)
    (root / "cli_stderr.txt").write_text(proc.stderr)
    return exp
