"""The container cluster for real, through the Docker SDK: build, run, sweep, read back, tear down.

Run with `make test-docker`: it starts dockerd where none answers and this machine can run one,
and builds on the offline stand-in base where Docker Hub cannot be reached (docker/offline.sh
passes RAYSWEEP_BASE_IMAGE and RAYSWEEP_WHEELHOUSE_URL). Without an engine this module is
skipped. The containers are those of docker-compose.cpu.yml, read by tests/container_files.py
(tests/test_containers.py checks the SDK calls against the compose files). Everything the
test creates (containers, network, volumes) is removed at the end, pass or fail; the image
`raysweep:sdk-test` is kept so the next run reuses its layers.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import secrets
import socket
import tarfile
import time
import urllib.error
import urllib.request
from pathlib import Path, PurePosixPath
from types import SimpleNamespace

import pytest

import container_files as files
from container_files import REPO

pytestmark = pytest.mark.docker
docker = pytest.importorskip("docker", reason="the Docker SDK (`docker` in the test extra) is not installed")


def _engine():
    import requests

    try:
        client = docker.from_env(timeout=1800)  # a cold build's pip step prints nothing for minutes
        client.ping()
    except (docker.errors.DockerException, requests.exceptions.RequestException) as err:
        return None, f"no Docker engine reachable through docker.from_env(): {str(err).splitlines()[0]}"
    if not client.api.base_url.startswith(("http+docker://localhost", "http://localhost", "http://127.0.0.1")):
        return None, f"the Docker engine at {client.api.base_url} is not local: the dashboard check needs its 127.0.0.1"
    return client, ""


CLIENT, WHY = _engine()
if CLIENT is None:
    pytest.skip(WHY, allow_module_level=True)

IMAGE_DIRS = ("raysweep", "configs", "analysis")  # what the Dockerfile copies into /app
LIST_FILES = """
import hashlib, json, os, sys
out = {}
for top in sys.argv[1:]:
    for root, dirs, names in os.walk(top):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        for n in names:
            p = os.path.join(root, n)
            out[p] = hashlib.sha256(open(p, "rb").read()).hexdigest()
print(json.dumps(out))
"""
PROCESS_UIDS = """
import json, os
uids = {}
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        status = open(f"/proc/{pid}/status").read().splitlines()
    except OSError:
        continue  # gone meanwhile
    fields = dict(line.split(":", 1) for line in status if ":" in line)
    uids.setdefault(fields["Name"].strip(), set()).update(int(u) for u in fields["Uid"].split())
print(json.dumps({name: sorted(u) for name, u in uids.items()}))  # every process of a name counts
"""


def _checked_out_files() -> dict[str, str]:
    """What the image should hold under /app: the checkout's files, less what .dockerignore drops."""
    from docker.utils.build import exclude_paths

    patterns = [p.strip() for p in (REPO / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]
    sent = exclude_paths(str(REPO), patterns)
    return {f"/app/{p}": hashlib.sha256((REPO / p).read_bytes()).hexdigest() for p in sorted(sent)
            if p.split("/")[0] in IMAGE_DIRS and (REPO / p).is_file() and "__pycache__" not in p}


def _wait(container, condition: str, timeout: float = 300) -> None:
    """Block until `container` meets a compose depends_on condition; fail with its logs if it cannot."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        container.reload()
        state = container.attrs["State"]
        health = state.get("Health", {}).get("Status")
        if state["Status"] == "exited" or health == "unhealthy":
            break
        if (condition == "service_healthy" and health == "healthy") or \
                (condition == "service_started" and state["Status"] == "running"):
            return
        time.sleep(2)
    logs = container.logs(tail=80).decode(errors="replace")
    pytest.fail(f"{container.name} did not become {condition} (state {container.attrs['State']}):\n{logs}")


def _put_secret(container, path: str, value: str) -> None:
    """Write a secret file before the container starts, as compose does for `environment:` secrets."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        rel = PurePosixPath(path).relative_to("/")
        for parent in reversed(rel.parents[:-1]):
            info = tarfile.TarInfo(str(parent))
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        data = value.encode()
        info = tarfile.TarInfo(str(rel))
        info.size, info.mode = len(data), 0o444
        tar.addfile(info, io.BytesIO(data))
    assert container.put_archive("/", buf.getvalue())


def _copy_out(container, path: str, dest: Path) -> None:
    stream, _ = container.get_archive(path)
    with tarfile.open(fileobj=io.BytesIO(b"".join(stream))) as tar:
        tar.extractall(dest, filter="data")


def _exec_json(container, code: str, *args: str):
    status, out = container.exec_run(["python", "-c", code, *args])
    assert status == 0, out.decode(errors="replace")
    return json.loads(out)


def _get(base: str, path: str, token: str | None = None) -> tuple[int, bytes]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(base + path, headers=headers), timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def _build(compose_file: Path, tag: str) -> float:
    """Build the image as compose would, offline where docker/offline.sh says so; seconds taken."""
    args = files.build_args(compose_file, tag, base_image=os.environ.get("RAYSWEEP_BASE_IMAGE"),
                            wheelhouse_url=os.environ.get("RAYSWEEP_WHEELHOUSE_URL"))
    start = time.time()
    try:
        CLIENT.images.build(**args)
    except docker.errors.BuildError as err:
        log = "".join(chunk.get("stream", "") or chunk.get("error", "") for chunk in err.build_log)
        pytest.fail(f"the image build failed: {err.msg}\n{log[-6000:]}")
    return time.time() - start


def _leftovers(project: str) -> list[str]:
    label = {"label": f"com.docker.compose.project={project}"}
    return ([f"container {c.name}" for c in CLIENT.containers.list(all=True, filters=label)]
            + [f"network {n.name}" for n in CLIENT.networks.list(filters=label)]
            + [f"volume {v.name}" for v in CLIENT.volumes.list(filters=label)])


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, pytestconfig):
    cfg = files.SDK_TEST
    compose_file = REPO / cfg["compose_file"]
    project = f"raysweep-sdktest-{secrets.token_hex(3)}"
    token = secrets.token_hex(32)
    # A free host port for the dashboard: 8265 may be another Ray's (any local `ray start`).
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    services = files.plan(compose_file, project=project,
                          env={"RAYSWEEP_IMAGE": cfg["image"], "RAY_AUTH_TOKEN": token,
                               "RAY_DASHBOARD_PORT": str(port)},
                          commands={"sweep": cfg["sweep_args"]})
    created, network, volumes = [], None, []
    try:
        checked_out = _checked_out_files()  # before the build: others may edit the checkout meanwhile
        build_s = _build(compose_file, cfg["image"])
        network = CLIENT.networks.create(f"{project}_default", labels={"com.docker.compose.project": project})
        names = sorted({v for svc in services.values() for v in svc.create["volumes"]})
        volumes = [CLIENT.volumes.create(n, labels={"com.docker.compose.project": project}) for n in names]
        containers = {}
        for name in files.start_order(services):
            svc = services[name]
            for dep, condition in svc.depends_on.items():
                _wait(containers[dep], condition)
            container = CLIENT.containers.create(**svc.create_kwargs(CLIENT.api.api_version))
            created.append(container)
            for path, value in svc.secrets.items():
                _put_secret(container, path, value)
            container.start()
            containers[name] = container
        start = time.time()
        status = containers["sweep"].wait(timeout=1800)["StatusCode"]
        sweep_s = time.time() - start
        logs = containers["sweep"].logs().decode(errors="replace")
        assert status == 0, f"the sweep exited {status}:\n{logs[-6000:]}"
        out = tmp_path_factory.mktemp("from-volume")
        # The results volume, read through the head (it mounts it, as every node does).
        _copy_out(containers["ray-head"], f"/results/{cfg['experiment']}", out)
        network.reload()
        for c in containers.values():
            c.reload()
        reporter = pytestconfig.pluginmanager.get_plugin("terminalreporter")
        capture = pytestconfig.pluginmanager.get_plugin("capturemanager")
        if reporter is not None and capture is not None:  # the two slow steps, shown despite capture
            with capture.global_and_fixture_disabled():
                reporter.write_line(f"\nimage build {build_s:.0f} s, smoke sweep {sweep_s:.0f} s")
        yield SimpleNamespace(containers=containers, token=token, experiment=out / cfg["experiment"], logs=logs,
                              network=network, checked_out=checked_out, port=port,
                              dashboard=f"http://127.0.0.1:{port}")
    finally:
        for container in reversed(created):
            container.remove(force=True, v=True)
        if network is not None:
            network.remove()
        for volume in volumes:
            volume.remove(force=True)
    left = _leftovers(project)
    assert not left, f"left behind: {left}"


def test_smoke_sweep_results_come_back_from_the_results_volume(cluster):
    import pandas as pd
    from ray import tune

    cfg = json.loads((cluster.experiment / "raysweep_config.json").read_text())
    analysis = tune.ExperimentAnalysis(str(cluster.experiment))
    grid = {(t.config["fraction"], t.config["seed"]) for t in analysis.trials}
    assert grid == {(f, s) for f in cfg["sweep"]["fractions"] for s in cfg["sweep"]["seeds"]}
    assert len(analysis.trials) == len(grid) and {t.status for t in analysis.trials} == {"TERMINATED"}
    epochs = cfg["train"]["epochs"]
    for df in analysis.trial_dataframes.values():
        ran = list(df["epoch"])
        assert ran == list(range(1, len(ran) + 1)) and (len(ran) == epochs or cfg["train"]["patience"] > 0)
        assert df["val_top5_error"].between(0, 1).all() and df["train_loss"].gt(0).all()
    # The sweep's own table: one row per trial, with the test split's error.
    summary = pd.read_csv(cluster.experiment / "summary.csv")
    assert set(zip(summary["fraction"], summary["seed"])) == grid and len(summary) == len(grid)
    assert summary["test_top5_error"].between(0, 1).all()


def test_containers_run_as_the_image_user_not_root(cluster):
    for name, container in cluster.containers.items():
        assert container.attrs["Config"]["User"] == "1000:1000", name
    ray_processes = {"ray-head": {"gcs_server", "raylet"}, "ray-worker": {"raylet"}}
    for name, expected in ray_processes.items():  # the sweep has exited
        uids = _exec_json(cluster.containers[name], PROCESS_UIDS)
        assert expected <= set(uids), f"{name}: {uids}"
        assert {u for ids in uids.values() for u in ids} == {1000}, f"{name}: {uids}"


def test_image_holds_the_checked_out_package_and_its_builtin_data(cluster):
    image = _exec_json(cluster.containers["ray-head"], LIST_FILES, *(f"/app/{d}" for d in IMAGE_DIRS))
    assert image == cluster.checked_out
    assert any("/raysweep/data/builtin/" in path for path in image), "no built-in data set in the image"


def test_dashboard_is_published_on_loopback_only(cluster):
    published = {name: {port: binds for port, binds in c.attrs["NetworkSettings"]["Ports"].items() if binds}
                 for name, c in cluster.containers.items() if name != "sweep"}
    assert published == {"ray-head": {"8265/tcp": [{"HostIp": "127.0.0.1", "HostPort": str(cluster.port)}]},
                         "ray-worker": {}}
    # The host's address on the compose network is not loopback: nothing answers there.
    gateway = cluster.network.attrs["IPAM"]["Config"][0]["Gateway"]
    with socket.socket() as probe:
        probe.settimeout(5)
        assert probe.connect_ex((gateway, cluster.port)) != 0, f"the dashboard answers on {gateway}"
    assert _get(cluster.dashboard, "/api/gcs_healthz")[0] == 200  # while it does answer on 127.0.0.1


def test_dashboard_refuses_requests_without_the_token(cluster):
    import ray

    assert _get(cluster.dashboard, "/api/version")[0] == 401  # no token
    assert _get(cluster.dashboard, "/api/version", token="not-the-token")[0] == 403
    status, body = _get(cluster.dashboard, "/api/version", token=cluster.token)
    assert status == 200 and json.loads(body)["ray_version"] == ray.__version__
    # The cluster the dashboard reports: the head and the worker alive, and the sweep's
    # container among the nodes (it joined to run the driver, and may have left by now).
    status, body = _get(cluster.dashboard, "/api/v0/nodes?detail=true", token=cluster.token)
    assert status == 200, body[:300]
    nodes = json.loads(body)["data"]["result"]["result"]
    ip = {name: c.attrs["NetworkSettings"]["Networks"][cluster.network.name]["IPAddress"]
          for name, c in cluster.containers.items() if name != "sweep"}
    alive = {n["node_ip"]: n["is_head_node"] for n in nodes if n["state"] == "ALIVE"}
    assert alive.get(ip["ray-head"]) is True and alive.get(ip["ray-worker"]) is False, nodes
    assert len(nodes) == 3, f"head, worker and the sweep's node, got {nodes}"
