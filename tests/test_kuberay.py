"""The KubeRay manifests (deploy/kuberay/), checked offline: against JSON schemas made from
KubeRay's own CRDs, and against the project (its CLI and config, its image, its trials' needs).

No Kubernetes cluster: the schemas (deploy/kuberay/schemas/, made by convert.py) refuse an
unknown field as the API server does, and the project's own parser and resource planner read
the entrypoint and the pods' sizes.
"""

from __future__ import annotations

import copy
import functools
import importlib
import importlib.util
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from container_files import REPO, dockerfile

KUBERAY = REPO / "deploy" / "kuberay"
SCHEMAS = KUBERAY / "schemas"
SCHEMA_OF = {"rayjob.yaml": "rayjob_v1.json", "raycluster.yaml": "raycluster_v1.json"}
BIN = Path(sys.executable).parent
# KubeRay's JobSubmissionMode values (ray-operator/apis/ray/v1/rayjob_types.go, v1.7.0); the
# CRD types the field as a plain string, so the schema cannot check it.
SUBMISSION_MODES = {"K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"}
GIB = 2 ** 30


def _first(*candidates: tuple[str, str]):
    """The first of (module, attribute) that imports: the layout of raysweep/ is moving."""
    for module, attr in candidates:
        try:
            return getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError):
            continue
    raise ImportError(f"none of {candidates} imports")


def build_parser():
    return _first(("raysweep.sweep.cli", "build_parser"), ("raysweep.tune", "build_parser"))()


def plan_resources(**kw):
    return _first(("raysweep.cluster.resources", "plan_resources"), ("raysweep.cluster", "plan_resources"))(**kw)


def manifest(name: str) -> dict:
    return yaml.safe_load((KUBERAY / name).read_text())


@functools.lru_cache(maxsize=None)
def validator(schema_name: str) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(json.loads((SCHEMAS / schema_name).read_text()))


def problems(doc: dict, schema_name: str) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path)) or '<top>'}: {e.message}"
            for e in validator(schema_name).iter_errors(doc)]


def cluster_spec(name: str) -> dict:
    doc = manifest(name)
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def groups(name: str) -> list[tuple[str, dict]]:
    spec = cluster_spec(name)
    return [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec["workerGroupSpecs"]]


def ray_container(group: dict) -> dict:
    return group["template"]["spec"]["containers"][0]  # KubeRay's Ray container is the first


def quantity(q) -> float:
    """A Kubernetes quantity (`12Gi`, `500m`, `8`) as a number."""
    m = re.fullmatch(r"([0-9.]+)([KMGTPE]i|[mkMGTPE])?", str(q))
    assert m, f"not a quantity: {q!r}"
    scale = {None: 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18,
             **{f"{p}i": 1024 ** (i + 1) for i, p in enumerate("KMGTPE")}}
    return float(m.group(1)) * scale[m.group(2)]


def shm_volume(group: dict) -> dict:
    """The volume the Ray container mounts at /dev/shm."""
    mounts = {m["mountPath"]: m["name"] for m in ray_container(group).get("volumeMounts", [])}
    assert "/dev/shm" in mounts, "no /dev/shm mount: KubeRay would size one to the memory limit"
    return {v["name"]: v for v in group["template"]["spec"]["volumes"]}[mounts["/dev/shm"]]


# --- the schemas ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(SCHEMA_OF))
def test_manifest_matches_the_kuberay_crd_schema(name):
    assert problems(manifest(name), SCHEMA_OF[name]) == []


def test_a_misspelt_field_fails_validation():
    job = manifest("rayjob.yaml")
    bad = copy.deepcopy(job)
    bad["spec"]["shutdownAfterJobFinish"] = bad["spec"].pop("shutdownAfterJobFinishes")
    assert problems(bad, "rayjob_v1.json") == [
        "spec: Additional properties are not allowed ('shutdownAfterJobFinish' was unexpected)"]
    # Deep inside a pod template: a worker's Ray container.
    bad = copy.deepcopy(job)
    container = bad["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    container["volumeMount"] = container.pop("volumeMounts")
    assert problems(bad, "rayjob_v1.json") == [
        "spec.rayClusterSpec.workerGroupSpecs.0.template.spec.containers.0: "
        "Additional properties are not allowed ('volumeMount' was unexpected)"]
    # A wrong kind and a misspelt key of the top-level metadata, in the RayCluster.
    bad = manifest("raycluster.yaml")
    bad["kind"], bad["metadata"]["lables"] = "RayJob", bad["metadata"].pop("labels")
    assert sorted(problems(bad, "raycluster_v1.json")) == [
        "kind: 'RayCluster' was expected",
        "metadata: Additional properties are not allowed ('lables' was unexpected)"]


def test_check_jsonschema_cli_as_make_kuberay_validate_runs_it(tmp_path):
    """The Makefile target's own commands pass on the manifests and fail on a misspelt copy."""
    dry = subprocess.run(["make", "-n", "kuberay-validate", f"BIN={BIN}"], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout
    commands = [line for line in dry.splitlines() if "check-jsonschema" in line]
    assert len(commands) == 2 and all(f"deploy/kuberay/{n}" in " ".join(commands) for n in SCHEMA_OF)
    for command in commands:
        proc = subprocess.run(command, shell=True, cwd=REPO, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    bad = tmp_path / "rayjob.yaml"
    bad.write_text((KUBERAY / "rayjob.yaml").read_text().replace("shutdownAfterJobFinishes:", "shutdownAfterJobFinish:"))
    job_command = next(c for c in commands if "rayjob.yaml" in c).replace("deploy/kuberay/rayjob.yaml", str(bad))
    proc = subprocess.run(job_command, shell=True, cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 1 and "'shutdownAfterJobFinish' was unexpected" in proc.stdout, proc.stdout


def _load_converter():
    spec = importlib.util.spec_from_file_location("kuberay_convert", SCHEMAS / "convert.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_converter_makes_structural_schemas_strict():
    convert = _load_converter()
    spec = {"type": "object", "properties": {
        "size": {"anyOf": [{"type": "integer"}, {"type": "string"}], "x-kubernetes-int-or-string": True,
                 "pattern": "^[0-9]+Gi$"},
        "port": {"x-kubernetes-int-or-string": True},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "free": {"type": "object", "properties": {"a": {"type": "string"}}, "x-kubernetes-preserve-unknown-fields": True},
        "when": {"type": "string", "nullable": True},
        "rules": {"type": "array", "items": {"type": "string"}, "x-kubernetes-list-type": "atomic"},
    }}
    top = {"type": "object", "properties": {"apiVersion": {"type": "string"}, "spec": spec}}
    crd = {"spec": {"group": "ray.io", "names": {"kind": "Thing"},
                    "versions": [{"name": "v1", "schema": {"openAPIV3Schema": top}}]}}
    schema = convert.convert(crd, "v1", "test")
    ok = {"apiVersion": "ray.io/v1", "kind": "Thing", "metadata": {"name": "x"},
          "spec": {"size": "12Gi", "port": 8265, "labels": {"k": "v"}, "free": {"a": "1", "extra": 2}, "when": None}}
    check = jsonschema.Draft202012Validator(schema)
    assert list(check.iter_errors(ok)) == []
    for bad in ({"size": "12GB"}, {"size": 1.5}, {"port": [1]}, {"labels": {"k": 1}}, {"when": 3}, {"sise": 1}):
        assert list(check.iter_errors({**ok, "spec": bad})), bad
    assert list(check.iter_errors({**ok, "apiVersion": "ray.io/v1alpha1"}))
    assert list(check.iter_errors({k: v for k, v in ok.items() if k != "metadata"}))
    # A Kubernetes extension it does not know is refused, not silently dropped.
    spec["properties"]["free"]["x-kubernetes-embedded-resource"] = True
    with pytest.raises(SystemExit, match="x-kubernetes-embedded-resource"):
        convert.convert(crd, "v1", "test")


def _objects(node, where="#"):
    if isinstance(node, dict):
        yield where, node
        for key, val in node.items():
            if key == "properties":
                for name, sub in val.items():
                    yield from _objects(sub, f"{where}/properties/{name}")
            elif isinstance(val, (dict, list)):
                yield from _objects(val, f"{where}/{key}")
    elif isinstance(node, list):
        for i, sub in enumerate(node):
            yield from _objects(sub, f"{where}/{i}")


@pytest.mark.parametrize("schema_name", sorted(SCHEMA_OF.values()))
def test_committed_schema_is_strict_small_and_names_its_source(schema_name):
    path = SCHEMAS / schema_name
    assert path.stat().st_size < 8 * 2 ** 20
    schema = json.loads(path.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    assert re.search(r"ray-project/kuberay v\d+\.\d+\.\d+ \([0-9a-f]{40}\)", schema["$comment"]), schema["$comment"]
    readme = (SCHEMAS / "README.md").read_text()
    assert re.search(r"[0-9a-f]{40}", schema["$comment"]).group() in readme
    loose = [w for w, node in _objects(schema) if "properties" in node and "additionalProperties" not in node]
    assert loose == [], loose[:5]
    assert not [w for w, node in _objects(schema) if any(str(k).startswith("x-kubernetes") for k in node)]


# --- the manifests against the project -------------------------------------------------------

def _image_workdir() -> str:
    return [args for instr, args in dockerfile() if instr == "WORKDIR"][-1]


def entrypoint_problems(entrypoint: str) -> list[str]:
    """Why the RayJob's entrypoint is not a valid run of the sweep CLI (empty: it is)."""
    argv = shlex.split(entrypoint)
    if argv[:3] != ["python", "-m", "raysweep.tune"] or importlib.util.find_spec(argv[2]) is None:
        return [f"{argv[:3]} is not `python -m raysweep.tune`"]
    try:
        args = build_parser().parse_args(argv[3:])
    except SystemExit:
        return [f"raysweep.tune refuses the flags {argv[3:]}"]
    workdir = _image_workdir()
    config = Path(args.config or "configs/default.yaml")
    if config.is_absolute():  # a path in the image: WORKDIR holds the repo's configs/
        if not config.is_relative_to(workdir):
            return [f"--config {config} is outside the image's WORKDIR {workdir}"]
        config = config.relative_to(workdir)
    if not (REPO / config).is_file():
        return [f"--config {config}: no such file in the repo"]
    from raysweep.config import config_from_args
    from raysweep.errors import RaysweepError

    args.config = str(REPO / config)
    try:
        config_from_args(args)
    except RaysweepError as err:
        return [str(err)]
    return []


def test_entrypoint_is_the_sweep_cli_with_valid_flags():
    entrypoint = manifest("rayjob.yaml")["spec"]["entrypoint"]
    assert entrypoint_problems(entrypoint) == []
    args = build_parser().parse_args(shlex.split(entrypoint)[3:])
    assert args.address == "auto", "without --address the sweep starts its own Ray in the head pod"
    assert Path(args.config).name == "default.yaml"
    # The config it names is in the image.
    copies = [a.split() for i, a in dockerfile() if i == "COPY"]
    assert ["configs/", "configs/"] in copies and _image_workdir() == "/app"
    # The check can fail.
    assert entrypoint_problems("python -m raysweep.tune --no-such-flag")
    assert entrypoint_problems("python -m raysweep.tune --config /app/configs/nope.yaml")
    assert entrypoint_problems("python -m raysweep.tune --set train.nonsense=1")
    assert entrypoint_problems("python -m raysweep.nope --config configs/default.yaml")


def _makefile_image() -> str:
    return re.search(r"^IMAGE\s*\?=\s*(\S+)", (REPO / "Makefile").read_text(), re.M).group(1)


@pytest.mark.parametrize("name", sorted(SCHEMA_OF))
def test_image_and_ray_version_are_the_projects(name):
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    compose_image = re.fullmatch(r"\$\{RAYSWEEP_IMAGE:-(.+)\}", compose["x-ray-node"]["image"]).group(1)
    assert _makefile_image() == compose_image
    for group_name, group in groups(name):
        assert ray_container(group)["image"] == compose_image, group_name
    ray_pin = re.search(r"^ray==(\S+)", (REPO / "constraints.txt").read_text(), re.M).group(1)
    assert cluster_spec(name)["rayVersion"] == ray_pin


@functools.lru_cache(maxsize=None)
def _ray_start_help() -> str:
    return subprocess.run([str(BIN / "ray"), "start", "--help"], capture_output=True, text=True, check=True).stdout


@pytest.mark.parametrize("name", sorted(SCHEMA_OF))
def test_ray_start_params_are_real_flags(name):
    # KubeRay passes each key as `ray start --key=value`; the schema allows any key.
    text = _ray_start_help()
    for group_name, group in groups(name):
        for key, value in group["rayStartParams"].items():
            assert isinstance(value, str), f"{group_name}: rayStartParams.{key} must be a string"
            assert re.search(rf"(?<![\w-])--{key}(?![\w-])", text), f"{group_name}: ray start has no --{key}"
    assert not re.search(r"(?<![\w-])--object-store-memry(?![\w-])", text)


def _sweep_config():
    from raysweep.config import config_from_args

    args = build_parser().parse_args(shlex.split(manifest("rayjob.yaml")["spec"]["entrypoint"])[3:])
    args.config = str(REPO / Path(args.config).relative_to(_image_workdir()))
    cfg = config_from_args(args, {"sweep.gpus_per_trial": args.gpus_per_trial})
    return cfg


@pytest.mark.parametrize("name", sorted(SCHEMA_OF))
def test_head_has_no_gpus_and_every_gpu_worker_fits_a_default_trial(name):
    head = cluster_spec(name)["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0" and head["rayStartParams"]["num-cpus"] == "0"
    res = ray_container(head).get("resources", {})
    assert not any("nvidia.com/gpu" in res.get(k, {}) for k in ("requests", "limits"))
    cfg = _sweep_config()
    workers = cluster_spec(name)["workerGroupSpecs"]
    assert workers
    for group in workers:
        params, res = group["rayStartParams"], ray_container(group)["resources"]
        gpus, cpus = int(params["num-gpus"]), float(params["num-cpus"])
        # What Ray advertises is what Kubernetes gives the pod (GPU requests must equal limits).
        assert gpus >= 1 and res["limits"]["nvidia.com/gpu"] == gpus
        assert res.get("requests", {}).get("nvidia.com/gpu", gpus) == gpus
        assert cpus <= quantity(res["limits"]["cpu"])
        # One pod alone must hold at least one trial of the default sweep, GPU and CPUs.
        plan = plan_resources(cluster_cpus=cpus, cluster_gpus=gpus, gpus_per_trial=cfg.sweep.gpus_per_trial,
                              cpus_per_trial=cfg.sweep.cpus_per_trial, max_trials=cfg.sweep.max_concurrent_trials)
        assert plan.use_gpu and plan.max_concurrent_trials >= 1, plan.describe()
        assert plan.num_workers * plan.gpus_per_worker <= gpus
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]


@pytest.mark.parametrize("name", sorted(SCHEMA_OF))
def test_dev_shm_is_memory_sized_for_the_object_store(name):
    for group_name, group in groups(name):
        empty = shm_volume(group).get("emptyDir", {})
        assert empty.get("medium") == "Memory", group_name
        shm = quantity(empty["sizeLimit"])
        store = float(group["rayStartParams"]["object-store-memory"])
        # Ray falls back to /tmp (slow) when the store does not fit in /dev/shm; NCCL and torch
        # also use /dev/shm, so leave them at least 1 GiB.
        assert store + GIB <= shm, f"{group_name}: object store {store:.3g} B in a {shm:.3g} B /dev/shm"
        # A memory-backed emptyDir counts against the container's memory limit.
        assert quantity(ray_container(group)["resources"]["limits"]["memory"]) > shm, group_name


@pytest.mark.parametrize("name", sorted(SCHEMA_OF))
def test_results_and_caches_are_on_the_shared_read_write_many_claim(name):
    pvc = manifest("pvc.yaml")
    assert pvc["kind"] == "PersistentVolumeClaim" and pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    args = build_parser().parse_args(shlex.split(manifest("rayjob.yaml")["spec"]["entrypoint"])[3:])
    cfg = _sweep_config()
    mount_paths = set()
    for group_name, group in groups(name):
        volumes = {v["name"]: v for v in group["template"]["spec"]["volumes"]}
        claims = [m for m in ray_container(group)["volumeMounts"]
                  if volumes[m["name"]].get("persistentVolumeClaim", {}).get("claimName") == pvc["metadata"]["name"]]
        assert len(claims) == 1, group_name
        mount_paths.add(claims[0]["mountPath"])
        env = {e["name"]: e.get("value") for e in ray_container(group).get("env", [])}
        assert Path(env["HF_HOME"]).is_relative_to(claims[0]["mountPath"]), group_name
    assert len(mount_paths) == 1, "every node must see the files at the same path"
    (mount,) = mount_paths
    assert Path(args.storage_path).is_relative_to(mount)
    assert Path(cfg.data.cache_dir).is_relative_to(mount)


def test_rayjob_runs_once_within_a_deadline_and_shares_the_raycluster_spec():
    job = manifest("rayjob.yaml")["spec"]
    assert job["shutdownAfterJobFinishes"] is True
    assert 0 < job["activeDeadlineSeconds"] <= 7 * 86400
    assert job["submissionMode"] in SUBMISSION_MODES
    assert cluster_spec("rayjob.yaml") == cluster_spec("raycluster.yaml")


@pytest.mark.parametrize("name", sorted(SCHEMA_OF))
def test_ray_token_comes_from_a_secret(name):
    auth = cluster_spec(name)["authOptions"]
    assert auth["mode"] == "token" and auth["secretName"] == "raysweep-ray-token"
    for group_name, group in groups(name):
        for e in ray_container(group).get("env", []):
            if e["name"].startswith("RAY_AUTH") or e["name"] == "HF_TOKEN":
                assert "value" not in e, f"{group_name}: {e['name']} set in the manifest"
