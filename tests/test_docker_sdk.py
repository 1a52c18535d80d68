"""The container cluster for real, through the Docker SDK: build, run, sweep, read back, tear down.

Run with `make test-docker` on a machine with a Docker engine; without one this module is
skipped. The containers are those of docker-compose.cpu.yml, read by tests/files.py
(tests/test_containers.py checks the SDK calls against the compose files). Everything the
test creates (containers, network, volumes) is removed at the end, pass or fail; the image
`raysweep:sdk-test` is kept so the next run reuses its layers.
"""

from __future__ import annotations

import io
import json
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
docker = pytest.importorskip("docker", reason="the Docker SDK (`docker` in requirements-dev.txt) is not installed")


def _engine():
    import requests

    try:
        client = docker.from_env(timeout=600)
        client.ping()
    except (docker.errors.DockerException, requests.exceptions.RequestException) as err:
        return None, f"no Docker engine reachable through docker.from_env(): {str(err).splitlines()[0]}"
    if not client.api.base_url.startswith(("http+docker://localhost", "http://localhost", "http://127.0.0.1")):
        return None, f"the Docker engine at {client.api.base_url} is not local: the dashboard check needs its 127.0.0.1"
    return client, ""


CLIENT, WHY = _engine()
if CLIENT is None:
    pytest.skip(WHY, allow_module_level=True)

DASHBOARD = "http://127.0.0.1:8265"


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


def _get(path: str, token: str | None = None) -> tuple[int, bytes]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(DASHBOARD + path, headers=headers), timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cfg = files.SDK_TEST
    compose_file = REPO / cfg["compose_file"]
    project = f"raysweep-sdktest-{secrets.token_hex(3)}"
    token = secrets.token_hex(32)
    services = files.plan(compose_file, project=project,
                                 env={"RAYSWEEP_IMAGE": cfg["image"], "RAY_AUTH_TOKEN": token},
                                 commands={"sweep": cfg["sweep_args"]})
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", 8265)) == 0:
            pytest.fail("127.0.0.1:8265 is already taken (another Ray dashboard? `make docker-down`)")
    created, network, volumes = [], None, []
    try:
        CLIENT.images.build(**files.build_args(compose_file, cfg["image"]))
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
        status = containers["sweep"].wait(timeout=1800)["StatusCode"]
        logs = containers["sweep"].logs().decode(errors="replace")
        assert status == 0, f"the sweep exited {status}:\n{logs[-6000:]}"
        out = tmp_path_factory.mktemp("from-volume")
        # The results volume, read through the head (it mounts it, as every node does).
        _copy_out(containers["ray-head"], f"/results/{cfg['experiment']}", out)
        yield SimpleNamespace(containers=containers, token=token, experiment=out / cfg["experiment"], logs=logs)
    finally:
        for container in reversed(created):
            container.remove(force=True)
        if network is not None:
            network.remove()
        for volume in volumes:
            volume.remove(force=True)


def test_smoke_sweep_results_come_back_from_the_results_volume(cluster):
    from ray import tune

    analysis = tune.ExperimentAnalysis(str(cluster.experiment))
    grid = {(t.config["fraction"], t.config["seed"]) for t in analysis.trials}
    assert grid == {(1.0, 0), (1.0, 1), (0.5, 0), (0.5, 1)}  # configs/smoke.yaml
    assert {t.status for t in analysis.trials} == {"TERMINATED"}
    for df in analysis.trial_dataframes.values():
        assert list(df["epoch"]) == [1, 2]
        assert df["val_top5_error"].between(0, 1).all()
    assert (cluster.experiment / "summary.csv").is_file()


def test_containers_run_as_the_image_user_not_root(cluster):
    for name in ("ray-head", "ray-worker"):
        code, out = cluster.containers[name].exec_run(["id", "-u"])
        assert code == 0 and out.decode().strip() == "1000"


def test_dashboard_answers_on_loopback_and_refuses_requests_without_the_token(cluster):
    import ray

    assert _get("/api/gcs_healthz")[0] == 200  # the health check path is public
    assert _get("/api/version")[0] == 401  # no token
    assert _get("/api/version", token="not-the-token")[0] == 403
    status, body = _get("/api/version", token=cluster.token)
    assert status == 200 and json.loads(body)["ray_version"] == ray.__version__
    # The head and the worker are alive in the cluster the dashboard reports.
    status, body = _get("/api/v0/nodes", token=cluster.token)
    nodes = json.loads(body)["data"]["result"]["result"]
    alive = [n for n in nodes if n["state"] == "ALIVE"]
    assert status == 200 and len(alive) == 2 and sum(n["is_head_node"] for n in alive) == 1
