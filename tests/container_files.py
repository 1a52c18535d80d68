"""The container files, read for the tests: Dockerfile steps, shell commands, compose services.

The Docker SDK has no compose support, so tests/test_docker_sdk.py starts the cluster from
what `plan` reads out of docker-compose*.yml, and tests/test_containers.py checks the result
against the files. A compose key `plan` does not translate is an error, so a new key in the
compose files cannot silently be left out of the SDK path.
"""

from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

REPO = Path(__file__).resolve().parent.parent

# Service keys the SDK path translates, and those it leaves out on purpose (with why).
TRANSLATED = {"image", "command", "entrypoint", "environment", "volumes", "ports", "shm_size",
              "init", "healthcheck", "secrets", "restart", "depends_on", "deploy"}
LEFT_OUT = {
    "build": "the SDK builds the image once (build_args), as `docker compose build` would",
    "expose": "documentation only: containers on one network reach every port anyway",
}


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, buf = [], ""
    for line in (REPO / "Dockerfile").read_text().splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        buf += line.rstrip()
        if buf.endswith("\\"):
            buf = buf[:-1] + " "
            continue
        instr, _, args = buf.strip().partition(" ")
        out.append((instr.upper(), " ".join(args.split())))
        buf = ""
    return out


def _split_shell(script: str, positional: list[str]) -> list[list[str]]:
    lex = shlex.shlex(script, posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    commands, cur = [], []
    for tok in list(lex) + [";"]:
        if tok in {"&&", "||", ";", "|"}:
            if cur:
                commands.append(cur[1:] if cur[0] == "exec" else cur)
            cur = []
        else:
            cur.extend(positional if tok == "$@" else [tok])
    return commands


def expand(argv: list[str]) -> list[list[str]]:
    """An exec-form command -> the commands it runs (`bash -c SCRIPT $0 ARGS...` split up)."""
    if argv[:2] in (["bash", "-c"], ["sh", "-c"]):
        return _split_shell(argv[2], argv[4:])
    return [argv]


_VAR = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}|\$(\w+)")


def interpolate(value: Any, env: Mapping[str, str]) -> Any:
    """Compose's variable syntax: ${VAR}, ${VAR:-default}, $VAR, and $$ for a literal $."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value
    parts = value.split("$$")
    subst = [_VAR.sub(lambda m: env.get(m[1] or m[3]) or (m[2] or ""), p) for p in parts]
    return "$".join(subst)


def load_compose(path: Path, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    raw = yaml.safe_load(Path(path).read_text())  # YAML merge keys (<<) resolved here
    return interpolate(raw, os.environ if env is None else env)


def duration_ns(text: str) -> int:
    """Compose durations ("5s", "1m30s", "200ms") in the nanoseconds the engine API wants."""
    units = {"h": 3600e9, "m": 60e9, "s": 1e9, "ms": 1e6, "us": 1e3, "ns": 1}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|ns|h|m|s)", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"not a compose duration: {text!r}")
    return int(sum(float(n) * units[u] for n, u in parts))


@dataclass
class Service:
    """One compose service as Docker SDK arguments, plus what the test does around them."""

    name: str
    create: dict[str, Any]  # kwargs for client.containers.create(...)
    secrets: dict[str, str] = field(default_factory=dict)  # path in container -> secret value
    depends_on: dict[str, str] = field(default_factory=dict)  # service -> condition

    def create_kwargs(self, api_version: str) -> dict[str, Any]:
        """create() kwargs, with the service name as a DNS alias on the network (as compose does)."""
        from docker.types import EndpointConfig

        network = self.create["network"]
        return {**self.create, "networking_config": {network: EndpointConfig(api_version, aliases=[self.name])}}


def _ports(specs: list[str]) -> dict[str, tuple[str, int]]:
    """["127.0.0.1:8265:8265"] -> {"8265/tcp": ("127.0.0.1", 8265)}."""
    out = {}
    for spec in map(str, specs):
        *host, container_port = spec.split(":")
        if len(host) not in (1, 2):
            raise ValueError(f"port {spec!r}: give [HOST_IP:]HOST_PORT:CONTAINER_PORT")
        host_ip, host_port = host if len(host) == 2 else ("", host[0])
        out[f"{container_port}/tcp"] = (host_ip, int(host_port))
    return out


def _device_requests(deploy: dict[str, Any]):
    from docker.types import DeviceRequest

    unknown = set(deploy) - {"resources"} or set(deploy.get("resources", {})) - {"reservations"}
    if unknown:
        raise ValueError(f"deploy keys not translated to the SDK: {sorted(unknown)}")
    requests = []
    for dev in deploy["resources"]["reservations"].get("devices", []):
        count = dev.get("count", "all")
        requests.append(DeviceRequest(driver=dev.get("driver", ""), count=-1 if count == "all" else int(count),
                                      device_ids=dev.get("device_ids", []),
                                      capabilities=[list(dev["capabilities"])]))
    return requests


def plan(compose_file: Path, *, project: str, env: Mapping[str, str],
         commands: Mapping[str, list[str]] | None = None) -> dict[str, Service]:
    """Every service of `compose_file` as SDK create() kwargs, named like compose names them.

    `env` is the environment compose would see (RAYSWEEP_IMAGE, RAY_AUTH_TOKEN, HF_TOKEN);
    `commands` replaces a service's command, as `docker compose run SERVICE ARGS...` does.
    """
    doc = load_compose(compose_file, env)
    network = f"{project}_default"
    secret_sources = doc.get("secrets", {})
    services = {}
    for name, svc in doc["services"].items():
        unknown = set(svc) - TRANSLATED - set(LEFT_OUT)
        if unknown:
            raise ValueError(f"{compose_file.name}: service {name} uses keys the SDK path does not "
                             f"translate: {sorted(unknown)} (add them to tests/container_files.py)")
        environment = {}
        for key, value in (svc.get("environment") or {}).items():
            value = env.get(key) if value is None else value  # `KEY:` passes the host's value through
            if value is not None:
                environment[key] = str(value)
        volumes = {}
        for spec in svc.get("volumes", []):
            source, target = spec.split(":")[:2]
            if source not in doc.get("volumes", {}):
                raise ValueError(f"{compose_file.name}: {name} mounts {source!r}, not a named volume")
            volumes[f"{project}_{source}"] = {"bind": target, "mode": "rw"}
        create: dict[str, Any] = {
            "image": svc["image"],
            "name": f"{project}-{name}-1",
            "command": (commands or {}).get(name, svc.get("command")),
            "entrypoint": svc.get("entrypoint"),
            "environment": environment,
            "volumes": volumes,
            "ports": _ports(svc.get("ports", [])),
            "shm_size": svc.get("shm_size"),
            "init": bool(svc.get("init", False)),
            "network": network,
            "labels": {"com.docker.compose.project": project, "com.docker.compose.service": name},
        }
        if svc.get("restart"):
            create["restart_policy"] = {"Name": svc["restart"]}
        hc = svc.get("healthcheck")
        if hc and not hc.get("disable"):
            create["healthcheck"] = {"test": hc["test"], **{
                key: duration_ns(hc[key]) for key in ("interval", "timeout", "start_period") if key in hc},
                "retries": int(hc.get("retries", 3))}
        if "deploy" in svc:
            create["device_requests"] = _device_requests(svc["deploy"])
        secrets = {}
        for ref in svc.get("secrets", []):
            source = ref if isinstance(ref, str) else ref["source"]
            target = source if isinstance(ref, str) else ref.get("target", source)
            var = secret_sources[source]["environment"]  # compose copies $VAR into the file
            if not env.get(var):
                raise ValueError(f"secret {source}: ${var} is not set")
            secrets[target if target.startswith("/") else f"/run/secrets/{target}"] = env[var]
        deps = svc.get("depends_on") or {}
        if isinstance(deps, list):  # the short form: started, not healthy
            deps = {dep: {} for dep in deps}
        depends = {dep: (cond or {}).get("condition", "service_started") for dep, cond in deps.items()}
        services[name] = Service(name, create, secrets, depends)
    return services


def start_order(services: Mapping[str, Service]) -> list[str]:
    """Services with their dependencies first (compose's order)."""
    order: list[str] = []

    def visit(name: str, seen: tuple[str, ...] = ()) -> None:
        if name in seen:
            raise ValueError(f"dependency cycle: {' -> '.join(seen + (name,))}")
        for dep in services[name].depends_on:
            visit(dep, seen + (name,))
        if name not in order:
            order.append(name)

    for name in services:
        visit(name)
    return order


def build_args(compose_file: Path, tag: str, *, base_image: str | None = None,
               wheelhouse_url: str | None = None) -> dict[str, Any]:
    """client.images.build(...) kwargs for the image every service runs (one `build:`).

    Offline (docker/offline.sh sets both): `base_image` replaces the Dockerfile's BASE_IMAGE,
    and pip installs only from the wheelhouse at `wheelhouse_url`, which is served on the
    host's loopback, hence a build on the host's network.
    """
    doc = load_compose(compose_file, {})
    contexts = {svc.get("build") for svc in doc["services"].values()}
    if len(contexts) != 1 or not isinstance(next(iter(contexts)), str):
        raise ValueError(f"{compose_file.name}: expected one `build: <dir>` for every service, got {contexts}")
    context = (compose_file.parent / contexts.pop()).resolve()
    args: dict[str, Any] = {"path": str(context), "dockerfile": "Dockerfile", "tag": tag, "rm": True, "forcerm": True}
    buildargs = {}
    if base_image:
        buildargs["BASE_IMAGE"] = base_image
    if wheelhouse_url:
        buildargs.update(PIP_NO_INDEX="1", PIP_FIND_LINKS=wheelhouse_url)
        args["network_mode"] = "host"
    if buildargs:
        args["buildargs"] = buildargs
    return args


# What tests/test_docker_sdk.py runs: the CPU variant, with the smoke sweep as the sweep's
# arguments (as `docker compose run --rm sweep ARGS...` would pass them).
SDK_TEST = {
    "compose_file": "docker-compose.cpu.yml",
    "image": "raysweep:sdk-test",  # through RAYSWEEP_IMAGE, as `make docker-run` sets it
    "experiment": "docker-smoke",
    "sweep_args": ["--config", "configs/smoke.yaml", "--name", "docker-smoke", "--quiet"],
}
