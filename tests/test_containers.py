"""The container files, checked without a Docker engine: lint, schema, entry points, pins, topology.

hadolint and check-jsonschema are the real binaries from the dev extras. The compose
topology (a head and a worker started by `ray start`, a sweep that joins with --address)
is simulated on 127.0.0.1 by the `ray_cluster` fixture, as the containers would run it.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

import container_files as files
from container_files import REPO, dockerfile, expand, load_compose

BIN = Path(sys.executable).parent
COMPOSE_FILES = ["docker-compose.yml", "docker-compose.cpu.yml"]
# What the CPU variant may change, and nothing else: the GPU reservation, the sweep's config.
CPU_DIFFERENCES = {("ray-worker", "deploy"), ("sweep", "command")}


def _tool(name: str) -> str:
    path = BIN / name
    assert path.exists(), f"{name} is missing from {BIN}: run `make install` (it is in the test extra)"
    return str(path)


# --- lint and schema -------------------------------------------------------------------

def test_hadolint_finds_nothing_in_the_dockerfile():
    proc = subprocess.run([_tool("hadolint"), "-f", "json", "Dockerfile"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0 and json.loads(proc.stdout) == [], proc.stdout + proc.stderr
    # An ignored rule needs its reason on the comment line above the pragma.
    lines = (REPO / "Dockerfile").read_text().splitlines()
    for i, line in enumerate(lines):
        if re.match(r"\s*#\s*hadolint\s+ignore=", line):
            assert i and re.match(r"\s*#\s*\S.{10,}", lines[i - 1]), f"Dockerfile:{i + 1}: ignore without a reason"
    # The linter is real: a known-bad file is flagged.
    bad = subprocess.run([_tool("hadolint"), "-f", "json", "-"], input="FROM python:latest\nUSER root\n",
                         capture_output=True, text=True)
    assert {f["code"] for f in json.loads(bad.stdout)} >= {"DL3007", "DL3002"}


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_compose_file_matches_the_compose_spec(name, tmp_path):
    check = [_tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec"]
    proc = subprocess.run([*check, name], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # The validator is real: the same file with a misspelt key is refused.
    bad = tmp_path / name
    bad.write_text(re.sub(r"^(\s+)shm_size:", r"\1shm_sizes:", (REPO / name).read_text(), count=1, flags=re.M))
    proc = subprocess.run([*check, str(bad)], capture_output=True, text=True)
    assert proc.returncode == 1 and "shm_sizes" in proc.stdout


# --- every command the image and the compose files run is a project entry point ---------

def runtime_commands() -> list[tuple[str, list[str]]]:
    """(where, argv) for every command the image and the compose files run."""
    out = []
    image = {}
    for instr, args in dockerfile():
        if instr in ("CMD", "ENTRYPOINT"):
            assert args.startswith("["), f"Dockerfile {instr} must be in exec (JSON) form"
            image[instr] = json.loads(args)
    image_cmd, image_entry = image.get("CMD", []), image.get("ENTRYPOINT")
    out += [("Dockerfile CMD", c) for c in expand((image_entry or []) + image_cmd)]
    for name in COMPOSE_FILES:
        for svc_name, svc in load_compose(REPO / name, {})["services"].items():
            # compose semantics: a service's entrypoint resets the image's CMD
            entry = svc.get("entrypoint", image_entry) or []
            argv = entry + (svc.get("command") or (image_cmd if "entrypoint" not in svc else []))
            out += [(f"{name} {svc_name}", c) for c in expand(argv)]
            test = (svc.get("healthcheck") or {}).get("test")
            if test:
                assert test[0] == "CMD", f"{name} {svc_name}: healthcheck must be exec form"
                out += [(f"{name} {svc_name} healthcheck", test[1:])]
    return out


@functools.lru_cache(maxsize=None)
def _help(*prefix: str) -> tuple[int, str]:
    proc = subprocess.run([*prefix, "--help"], cwd=REPO, capture_output=True, text=True, timeout=300)
    return proc.returncode, proc.stdout + proc.stderr


def command_problems(argv: list[str]) -> list[str]:
    """Why `argv` is not a real entry point of the project (empty list: it is)."""
    flags = [a.split("=", 1)[0] for a in argv if a.startswith("--")]
    if argv[:2] == ["python", "-m"]:
        rc, text = _help(sys.executable, "-m", argv[2])
        if rc != 0:
            return [f"`python -m {argv[2]} --help` exits {rc}: {text.strip().splitlines()[-1:]}"]
        problems = [f"{argv[2]} has no flag {f}" for f in flags if not re.search(rf"(?<![\w-]){f}(?![\w-])", text)]
        args = argv[3:]
        config = args[args.index("--config") + 1] if "--config" in args else None
        if config and not (REPO / config).is_file():
            problems.append(f"--config {config}: no such file in the repo")
        from raysweep.config import load_config
        from raysweep.errors import RaysweepError

        for i, a in enumerate(args[:-1]):
            if a == "--set":
                try:
                    load_config(REPO / config if config else None, [args[i + 1]])
                except RaysweepError as err:
                    problems.append(f"--set {args[i + 1]}: {err}")
        return problems
    if argv[:2] == ["python", "-c"]:
        compile(argv[2], "<healthcheck>", "exec")
        return []
    if argv[0] == "ray":
        rc, text = _help(str(BIN / "ray"), argv[1])
        if rc != 0:
            return [f"`ray {argv[1]} --help` exits {rc}"]
        return [f"ray {argv[1]} has no flag {f}" for f in flags if not re.search(rf"(?<![\w-]){f}(?![\w-])", text)]
    return [f"{argv[0]!r} is not a project entry point"]


def test_every_command_the_containers_run_is_a_real_entry_point():
    problems = [f"{where}: {p}" for where, argv in runtime_commands() for p in command_problems(argv)]
    assert not problems, "\n".join(problems)


def test_the_entry_point_check_can_fail():
    assert command_problems(["python", "-m", "raysweep.no_such_module"])
    assert command_problems(["ray", "start", "--no-such-flag"])
    assert command_problems(["python", "-m", "raysweep.config", "--set", "train.nonsense=1"])
    assert command_problems(["curl", "http://localhost"])


# --- one source of truth for dependencies -------------------------------------------------

def _pins() -> dict[str, str]:
    from packaging.utils import canonicalize_name

    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version and not any(c in version for c in "<>=!~,;"), f"constraints.txt: {line!r} is not an exact pin"
            pins[canonicalize_name(name)] = version
    return pins


def test_ranges_in_pyproject_exact_pins_in_constraints_installed_as_pinned():
    from importlib.metadata import requires, version

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert "dependencies" not in project.get("dynamic", []), "dependencies are stated in pyproject.toml"
    pins = _pins()
    reqs = [Requirement(r) for r in project["dependencies"]]
    for extra in project["optional-dependencies"].values():
        reqs += [Requirement(r) for r in extra if not r.startswith("raysweep[")]
    for req in reqs:
        name = canonicalize_name(req.name)
        assert not [s for s in req.specifier if s.operator in ("==", "===")], f"pyproject.toml pins {req}: a range belongs there"
        assert name in pins, f"{req.name} has no pin in constraints.txt: run make lock"
        assert req.specifier.contains(pins[name]), f"constraints.txt's {req.name}=={pins[name]} is outside {req}"
        assert version(req.name) == pins[name], f"installed {req.name} differs from its pin: run make install"
    # The site-PyTorch floors admit the GPU node's own torch 2.11 and torchvision 0.26.
    floors = {canonicalize_name(r.name): r.specifier for r in reqs}
    assert floors["torch"].contains("2.11.0") and floors["torchvision"].contains("0.26.0")
    # What is installed is what pyproject.toml says (an editable install of this tree).
    installed = {str(Requirement(r)) for r in requires("raysweep") if "extra ==" not in r}
    assert installed == {str(Requirement(r)) for r in project["dependencies"]}
    # make install and CI install the ranges at the pinned versions.
    assert re.search(r'pip install .*-c constraints\.txt -e "\.\[test\]"', (REPO / "Makefile").read_text())


def test_image_installs_the_runtime_ranges_at_the_pinned_versions():
    steps = dockerfile()
    pip = [(i, args) for i, (instr, args) in enumerate(steps) if instr == "RUN" and "pip install" in args]
    assert len(pip) == 1, "the image must install dependencies in one pip step"
    at, args = pip[0]
    # The step lists pyproject.toml's runtime dependencies, then installs them under the lock.
    assert "['project']['dependencies']" in args and "/tmp/deps/pyproject.toml" in args
    tokens = shlex.split(args.split("&& pip install", 1)[1].split("&&")[0])
    assert tokens[tokens.index("-c") + 1] == "/tmp/deps/constraints.txt"
    assert tokens[tokens.index("-r") + 1] == "/tmp/deps/runtime.txt"
    assert [t for t in tokens if not t.startswith("-") and not t.startswith("/tmp/deps/")] == [], \
        "packages installed outside pyproject.toml"
    copies = [a.split() for instr, a in steps[:at] if instr == "COPY"]
    assert ["pyproject.toml", "constraints.txt", "/tmp/deps/"] in copies
    source_at = next(i for i, (instr, a) in enumerate(steps) if instr == "COPY" and a.startswith("raysweep/"))
    assert at < source_at, "dependencies must be installed before the source is copied"
    # The image's Python is the one the pins were resolved and tested with here: the public
    # image by default; an offline build replaces BASE_IMAGE (docker/base-offline.sh).
    assert steps[0] == ("ARG", steps[0][1]) and next(a for instr, a in steps if instr == "FROM") == "${BASE_IMAGE}"
    base = steps[0][1].removeprefix("BASE_IMAGE=")
    assert re.match(rf"python:{sys.version_info.major}\.{sys.version_info.minor}\.\d+-slim-bookworm$", base), base
    # pip's source comes from build args only (PyPI when unset), never baked into the image.
    build_args = {a.split("=")[0] for instr, a in steps[:at] if instr == "ARG"}
    assert build_args == {"BASE_IMAGE", "PIP_NO_INDEX", "PIP_FIND_LINKS"}
    assert not [a for instr, a in steps if instr == "ENV" and re.search(r"PIP_(NO_INDEX|FIND_LINKS|INDEX_URL)", a)]


# --- the compose cluster ---------------------------------------------------------------

def _mounts(svc: dict) -> dict[str, str]:
    return {v.split(":")[1]: v.split(":")[0] for v in svc.get("volumes", [])}  # target -> volume


@functools.lru_cache(maxsize=None)
def _ray_constant_names() -> str:
    """The environment variables Ray's constants read (the source of ray_constants)."""
    import importlib.util

    return Path(importlib.util.find_spec("ray._private.ray_constants").origin).read_text()


def _env(step: str) -> dict[str, str]:
    return dict(kv.split("=", 1) for kv in shlex.split(step))


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_compose_cluster_layout(name):
    from docker.utils import parse_bytes

    doc = load_compose(REPO / name, {})
    services = doc["services"]
    head, worker, sweep = services["ray-head"], services["ray-worker"], services["sweep"]
    # The GCS stays inside the compose network; the dashboard is on the host's loopback only.
    published = [str(p) for s in services.values() for p in s.get("ports", [])]
    assert published == ["127.0.0.1:8265:8265"] == head["ports"]  # RAY_DASHBOARD_PORT unset
    moved = load_compose(REPO / name, {"RAY_DASHBOARD_PORT": "18265"})["services"]["ray-head"]["ports"]
    assert moved == ["127.0.0.1:18265:8265"]
    assert {"--port=6379", "--dashboard-host=0.0.0.0", "--num-gpus=0"} <= set(head["command"])
    assert "deploy" not in head and "deploy" not in sweep
    # Workers scale (no fixed name, no host port) and join only once the head is healthy.
    assert "container_name" not in worker and "--address=ray-head:6379" in worker["command"]
    assert worker["depends_on"] == {"ray-head": {"condition": "service_healthy"}}
    assert sweep["depends_on"] == {"ray-head": {"condition": "service_healthy"},
                                   "ray-worker": {"condition": "service_healthy"}}
    # The health checks probe the ports the Ray commands open (public, token-free paths).
    assert re.search(r"127\.0\.0\.1:8265/api/gcs_healthz'", head["healthcheck"]["test"][-1])
    agent = re.search(r"127\.0\.0\.1:(\d+)/api/local_raylet_healthz'", worker["healthcheck"]["test"][-1])
    assert f"--dashboard-agent-listen-port={agent[1]}" in worker["command"]
    assert "--dashboard-port=8265" in head["command"]
    # The sweep joins as an empty node (a driver needs a local raylet), then runs the CLI.
    join, tune = expand(sweep["entrypoint"] + sweep["command"])
    assert join[:3] == ["ray", "start", "--address=ray-head:6379"] and {"--num-cpus=0", "--num-gpus=0"} <= set(join)
    assert tune[:3] == ["python", "-m", "raysweep.tune"] and tune[tune.index("--address") + 1] == "ray-head:6379"
    # Every node mounts the same named volumes at the same paths (Tune needs shared storage).
    mounts = _mounts(head)
    assert all(_mounts(s) == mounts for s in services.values())
    assert set(mounts.values()) == set(doc["volumes"]) == {"raysweep-cache", "hf-cache", "results"}
    target = {v: t for t, v in mounts.items()}
    assert tune[tune.index("--storage-path") + 1] == target["results"]
    assert f"data.cache_dir={target['raysweep-cache']}" in tune
    steps = dockerfile()
    env = {k: v for instr, a in steps if instr == "ENV" for k, v in _env(a).items()}
    assert env["HF_HOME"] == target["hf-cache"]
    # The image creates the mount points owned by its (non-root) user: named volumes copy that.
    uid = next(a for instr, a in reversed(steps) if instr == "USER").split(":")[0]
    assert uid.isdigit() and int(uid) != 0
    setup = next(a for instr, a in steps if instr == "RUN" and "useradd" in a)
    assert f"--uid {uid}" in setup and re.search(rf"chown -R {uid}:\d+ ", setup)
    assert all(t in setup.split() for t in mounts)
    # /dev/shm holds the object store. Its size is set, never Ray's default alone (30% of RAM,
    # up to all of /dev/shm): a flag, or the cap on the default. It fits in shm_size, and a
    # node that trains keeps room beside it for NCCL and torch (checkpoints go to disk).
    for svc_name, svc in services.items():
        argv = [a for c in expand((svc.get("entrypoint") or []) + (svc.get("command") or [])) for a in c]
        shm = parse_bytes(svc["shm_size"])
        flag = [int(a.split("=")[1]) for a in argv if a.startswith("--object-store-memory=")]
        store = flag[0] if flag else int(svc["environment"]["RAY_DEFAULT_OBJECT_STORE_MAX_MEMORY_BYTES"])
        assert store <= 0.95 * shm, f"{svc_name}: a {store} B object store does not fit a {shm} B /dev/shm"
        if "--num-cpus=0" not in argv:
            assert shm - store >= 2 * 2**30, f"{svc_name}: under 2 GiB of /dev/shm beside the object store"
    # One Ray token for all: a secret filled from $RAY_AUTH_TOKEN, never a value in a file.
    assert doc["secrets"] == {"ray_auth_token": {"environment": "RAY_AUTH_TOKEN"}}
    for svc in services.values():
        assert svc["secrets"] == ["ray_auth_token"]
        assert svc["environment"]["RAY_AUTH_MODE"] == "token"
        assert svc["environment"]["RAY_AUTH_TOKEN_PATH"] == "/run/secrets/ray_auth_token"
        assert "RAY_AUTH_TOKEN" not in svc["environment"] and svc["environment"]["HF_TOKEN"] is None
        # The cap on Ray's default store, where Ray reads it (ray_constants, at import).
        assert "RAY_DEFAULT_OBJECT_STORE_MAX_MEMORY_BYTES" in _ray_constant_names()
    assert not [a for instr, a in steps if instr in ("ENV", "ARG") and "TOKEN" in a]
    # GPUs: reserved by the workers of the GPU file only.
    gpu = worker.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
    if name == "docker-compose.yml":
        assert [(d["driver"], d["capabilities"]) for d in gpu] == [("nvidia", ["gpu"])]
    else:
        assert not gpu and "nvidia" not in (REPO / name).read_text().replace("NVIDIA", "")


def test_cpu_variant_is_the_gpu_file_without_gpus():
    from raysweep.config import load_config

    gpu, cpu = (load_compose(REPO / n, {}) for n in COMPOSE_FILES)
    assert {k: v for k, v in gpu.items() if k != "services"} == {k: v for k, v in cpu.items() if k != "services"}
    assert gpu["services"].keys() == cpu["services"].keys()
    for svc in gpu["services"]:
        g, c = gpu["services"][svc], cpu["services"][svc]
        for key in g.keys() | c.keys():
            if (svc, key) not in CPU_DIFFERENCES:
                assert g.get(key) == c.get(key), f"{svc}.{key} differs between the GPU and CPU files"
    assert "deploy" not in cpu["services"]["ray-worker"]
    config = cpu["services"]["sweep"]["command"][1]
    source = load_config(REPO / config).data.source
    assert source == "synthetic" or source.startswith("builtin:"), f"{config} would download {source}"


def test_makefile_docker_targets_pass_arguments_through():
    def dry(*args: str) -> str:
        proc = subprocess.run(["make", "-n", "-C", str(REPO), *args], capture_output=True, text=True,
                              env={**os.environ, "RAY_AUTH_TOKEN": "x"})
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    image = re.match(r"\$\{RAYSWEEP_IMAGE:-(.+)\}$", yaml.safe_load((REPO / COMPOSE_FILES[0]).read_text())
                     ["x-ray-node"]["image"])[1]
    out = dry("docker-run", "ARGS=--num-gpus 4 --seeds 0")
    assert f"docker/offline.sh build {image}" in out and f"RAYSWEEP_IMAGE={image}" in out
    assert "-f docker-compose.yml run --rm sweep --config configs/default.yaml --num-gpus 4 --seeds 0" in out
    out = dry("docker-run-cpu", "WORKERS=2")
    assert "-f docker-compose.cpu.yml up -d --wait --scale ray-worker=2 ray-head ray-worker" in out
    assert "-f docker-compose.cpu.yml run --rm sweep --config configs/demo.yaml" in out
    assert "down" in dry("docker-down") and "logs" in dry("docker-logs")
    # The container tests run under the engine helper, offline where Docker Hub cannot be reached.
    out = dry("test-docker", "STAMP=Makefile", "PYTEST_ARGS=-x")
    assert re.search(r"docker/engine\.sh run docker/offline\.sh run \S+/python -m pytest -m docker -v -x "
                     r"tests/test_docker_sdk\.py", out), out


def test_dockerignore_keeps_results_caches_and_secrets_out(tmp_path):
    from docker.utils.build import PatternMatcher
    from docker.utils.build import exclude_paths

    patterns = [p.strip() for p in (REPO / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]
    files = [".venv/bin/python", ".git/HEAD", ".notes/COMMON.md", "results/demo/result.json",
             ".cache/raysweep/x.npy", "data/train.parquet", "raysweep/__pycache__/a.pyc",
             ".pytest_cache/v", "raysweep/tune.py", "configs/smoke.yaml", "constraints.txt"]
    for f in files:
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / f).write_text("x")
    sent = {p for p in exclude_paths(str(tmp_path), patterns) if (tmp_path / p).is_file()}
    assert sent == {"raysweep/tune.py", "configs/smoke.yaml", "constraints.txt"}
    # And everything the Dockerfile copies does reach the daemon.
    matcher = PatternMatcher(patterns)
    for instr, args in dockerfile():
        for src in args.split()[:-1] if instr == "COPY" else []:
            paths = [src] if (REPO / src).is_file() else \
                [str(p.relative_to(REPO)) for p in (REPO / src).rglob("*") if p.is_file() and p.suffix != ".pyc"]
            assert paths and not [p for p in paths if matcher.matches(p)], f"COPY {src} is excluded"


# --- the Docker SDK path (tests/test_docker_sdk.py) cannot drift from the files -------------

@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_sdk_containers_are_the_compose_services(name):
    from docker.models.containers import _create_container_args
    from docker.utils import parse_bytes

    raw = yaml.safe_load((REPO / name).read_text())  # read independently of container_files
    env = {"RAYSWEEP_IMAGE": "img:tag", "RAY_AUTH_TOKEN": "tok", "HF_TOKEN": "hf"}
    plan = files.plan(REPO / name, project="p", env=env)
    assert files.start_order(plan) == ["ray-head", "ray-worker", "sweep"]
    for svc_name, svc in raw["services"].items():
        spec = plan[svc_name]
        # The request body the SDK sends to the engine's /containers/create.
        body = _create_container_args({**spec.create_kwargs("1.45"), "version": "1.45", "detach": True})
        host = body["host_config"]
        assert body["image"] == "img:tag" and raw["x-ray-node"]["image"] == "${RAYSWEEP_IMAGE:-raysweep:latest}"
        assert body["command"] == svc.get("command")
        assert body["entrypoint"] == (None if "entrypoint" not in svc else
                                      [a.replace("$$", "$") for a in svc["entrypoint"]])
        assert sorted(host["Binds"]) == sorted(f"p_{v.split(':')[0]}:{v.split(':')[1]}:rw" for v in svc["volumes"])
        ports = [re.sub(r"\$\{\w+:-(.+?)\}", r"\1", p) for p in svc.get("ports", [])]  # the defaults
        assert host.get("PortBindings", {}) == {
            f"{p.split(':')[2]}/tcp": [{"HostIp": p.split(":")[0], "HostPort": p.split(":")[1]}] for p in ports}
        default_shm = re.sub(r"\$\{\w+:-(.+)\}", r"\1", str(svc["shm_size"]))
        assert host["ShmSize"] == parse_bytes(default_shm) and host["Init"] is svc["init"] is True
        assert body["networking_config"]["EndpointsConfig"] == {"p_default": {"Aliases": [svc_name]}}
        assert body["environment"] == {"RAY_AUTH_MODE": "token", "HF_TOKEN": "hf",
                                       "RAY_AUTH_TOKEN_PATH": "/run/secrets/ray_auth_token",
                                       "RAY_DEFAULT_OBJECT_STORE_MAX_MEMORY_BYTES": "10000000000"}
        assert spec.secrets == {"/run/secrets/ray_auth_token": "tok"}  # the file compose would write
        if "healthcheck" in svc and not svc["healthcheck"].get("disable"):
            assert body["healthcheck"]["test"] == svc["healthcheck"]["test"]
        devices = host.get("DeviceRequests") or []
        if "deploy" in svc:
            assert [(d["Driver"], d["Count"], d["Capabilities"]) for d in devices] == [("nvidia", -1, [["gpu"]])]
        else:
            assert devices == []
    online = files.build_args(REPO / name, "t")
    assert online["path"] == str(REPO) and (REPO / online["dockerfile"]).is_file()
    assert "buildargs" not in online and "network_mode" not in online  # the Dockerfile's defaults: PyPI
    offline = files.build_args(REPO / name, "t", base_image="base:x", wheelhouse_url="http://127.0.0.1:1/")
    assert offline == {**online, "network_mode": "host", "buildargs": {
        "BASE_IMAGE": "base:x", "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": "http://127.0.0.1:1/"}}


def test_sdk_test_runs_the_cpu_file_and_a_real_sweep():
    cfg = files.SDK_TEST
    assert cfg["compose_file"] == "docker-compose.cpu.yml"
    plan = files.plan(REPO / cfg["compose_file"], project="p", env={"RAY_AUTH_TOKEN": "t"},
                             commands={"sweep": cfg["sweep_args"]})
    sweep = plan["sweep"].create
    commands = expand(sweep["entrypoint"] + sweep["command"])
    assert not [p for c in commands for p in command_problems(c)]
    assert commands[-1][-len(cfg["sweep_args"]):] == cfg["sweep_args"]
    assert commands[-1][commands[-1].index("--name") + 1] == cfg["experiment"]
    source = (REPO / "tests" / "test_docker_sdk.py").read_text()
    for call in ("files.plan(", "files.build_args(", ".create_kwargs(", "files.start_order("):
        assert call in source, f"test_docker_sdk.py must start containers through {call}"


# --- the compose topology, simulated on 127.0.0.1 ----------------------------------------

def test_the_sweep_ran_on_a_cluster_it_did_not_start(ray_cluster, ray_session, smoke_experiment, tmp_path):
    """As in docker-compose: a head and a worker from `ray start`, the sweep joining with --address."""
    import ray
    from ray import tune

    # Only the two nodes `ray start` made: the sweep neither added one nor took one down.
    assert sum(node["Alive"] for node in ray.nodes()) == 2
    cfg = json.loads((smoke_experiment / "raysweep_config.json").read_text())
    analysis = tune.ExperimentAnalysis(str(smoke_experiment))
    assert len(analysis.trials) == len(cfg["sweep"]["fractions"]) * len(cfg["sweep"]["seeds"])
    assert {t.status for t in analysis.trials} == {"TERMINATED"}
    stamps = [ts for df in analysis.trial_dataframes.values() for ts in df["timestamp"]]
    # The CLI's driver is in this cluster's job table (debug API), and the trials ran while
    # it was connected: its job spans every reported result.
    drivers = [job for job in ray._private.state.jobs()
               if "raysweep.tune" in job["Entrypoint"] and f"--address {ray_cluster}" in job["Entrypoint"]
               and job["StartTime"] / 1000 - 1 <= min(stamps)
               and max(stamps) <= (job["EndTime"] or math.inf) / 1000 + 1]
    assert drivers, "no raysweep.tune driver on this cluster spans the smoke trials"
    assert all(job["IsDead"] and job["DriverPid"] != os.getpid() for job in drivers)
    # The results read back after moving them, as the container test copies them off its volume.
    moved = shutil.copytree(smoke_experiment, tmp_path / "moved")
    again = tune.ExperimentAnalysis(str(moved))
    assert sorted(t.trial_id for t in again.trials) == sorted(t.trial_id for t in analysis.trials)
    assert all(len(df) == cfg["train"]["epochs"] for df in again.trial_dataframes.values())


# --- the helpers `make test-docker` and `make docker-build` run (docker/*.sh) ---------------
# The docker and dockerd they call are stand-ins here that log their arguments: what is
# checked is each script's own decisions, and the wheelhouse server for real.

def _fake_tools(tmp_path: Path, engine_up: str) -> dict[str, str]:
    """A PATH whose `docker` logs each call and answers `info` while `engine_up` exists."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "docker").write_text(f"""#!{sys.executable}
import json, os, sys, urllib.request
args = sys.argv[1:]
with open(os.environ["FAKE_LOG"], "a") as log:
    log.write(json.dumps(args) + "\\n")
    for url in [a.split("=", 1)[1] for a in args if a.startswith("PIP_FIND_LINKS=")]:
        log.write(json.dumps(urllib.request.urlopen(url, timeout=5).read().decode()) + "\\n")  # as pip reads it
sys.exit(0 if args[0] in ("build", "image") or os.path.exists({str(engine_up)!r}) else 1)
""")
    (bin_dir / "dockerd").write_text(f"#!/bin/sh\ntouch {engine_up}\ntrap 'rm -f {engine_up}; exit 0' TERM\n"
                                     "while :; do sleep 0.1; done\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("DOCKER_HOST", "OFFLINE")}
    return {**env, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_LOG": str(tmp_path / "calls.log"),
            "RAYSWEEP_DOCKERD_PIDFILE": str(tmp_path / "dockerd.pid"), "DOCKER": str(bin_dir / "docker"),
            "WHEEL_PYTHON": sys.executable}


def _calls(env: dict[str, str]) -> list:
    log = Path(env["FAKE_LOG"])
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def test_offline_build_serves_the_wheelhouse_to_a_host_network_build(tmp_path):
    env = _fake_tools(tmp_path, engine_up=str(tmp_path / "up"))
    (tmp_path / "up").touch()
    wheelhouse = tmp_path / "wheelhouse"
    wheelhouse.mkdir()
    (wheelhouse / "demo-1.0-py3-none-any.whl").write_bytes(b"PK")
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    inputs = "\n".join(deps) + "\n" + (REPO / "constraints.txt").read_text()  # as offline.sh's inputs()
    (wheelhouse / ".inputs").write_text(inputs)  # built from these ranges and pins: not rebuilt
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env.update(WHEELHOUSE=str(wheelhouse), WHEELHOUSE_PORT=str(port), OFFLINE="1")
    proc = subprocess.run([REPO / "docker/offline.sh", "build", "img:t"], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    inspect, build, listing = _calls(env)
    assert inspect == ["image", "inspect", "python-standin:3.11-bookworm-local"]  # present: not rebuilt
    assert build == ["build", "--network", "host", "--build-arg", "BASE_IMAGE=python-standin:3.11-bookworm-local",
                     "--build-arg", "PIP_NO_INDEX=1", "--build-arg", f"PIP_FIND_LINKS=http://127.0.0.1:{port}/",
                     "-t", "img:t", "."]
    assert 'href="demo-1.0-py3-none-any.whl"' in listing
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", port)) != 0, "the wheelhouse server outlived the build"
    # OFFLINE=0, or a base image that is already here: the plain build, from PyPI.
    for offline in ("0", "auto"):
        Path(env["FAKE_LOG"]).unlink()
        proc = subprocess.run([REPO / "docker/offline.sh", "build", "img:t"], env={**env, "OFFLINE": offline},
                              capture_output=True, text=True)
        assert proc.returncode == 0 and _calls(env)[-1] == ["build", "-t", "img:t", "."], proc.stderr


def test_engine_helper_leaves_a_running_engine_alone_and_passes_the_status_on(tmp_path):
    up = tmp_path / "up"
    env = _fake_tools(tmp_path, engine_up=str(up))
    up.touch()  # an engine answers
    proc = subprocess.run([REPO / "docker/engine.sh", "run", "sh", "-c", "exit 7"], env=env, capture_output=True, text=True)
    assert proc.returncode == 7 and not Path(env["RAYSWEEP_DOCKERD_PIDFILE"]).exists(), proc.stderr
    up.unlink()  # none answers, and DOCKER_HOST points elsewhere: nothing to start, the command still runs
    proc = subprocess.run([REPO / "docker/engine.sh", "run", "sh", "-c", "exit 7"], capture_output=True, text=True,
                          env={**env, "DOCKER_HOST": "tcp://127.0.0.1:9"})
    assert proc.returncode == 7 and "DOCKER_HOST=tcp://127.0.0.1:9 is set and does not answer" in proc.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="engine.sh starts dockerd only as root")
def test_engine_helper_starts_dockerd_for_the_command_and_stops_it_after(tmp_path):
    up = tmp_path / "up"
    env = _fake_tools(tmp_path, engine_up=str(up))
    proc = subprocess.run([REPO / "docker/engine.sh", "run", "sh", "-c", f"test -e {up} && docker info"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr  # the engine answered while the command ran
    assert "starting dockerd" in proc.stderr and "stopped dockerd" in proc.stderr
    assert not up.exists() and not Path(env["RAYSWEEP_DOCKERD_PIDFILE"]).exists()
