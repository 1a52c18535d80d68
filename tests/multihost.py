"""A Ray cluster of real hosts on one machine, for tests/test_multihost.py.

Each host is a Linux network namespace with its own address on a bridge (veth pairs), so Ray
sees separate nodes that reach each other only over that network, as hosts on a LAN do. The
bridge sits in a namespace of its own: the root namespace gets no interface and no address,
and nothing leaves the bridge. Addresses come from 198.18.0.0/24 (RFC 2544, reserved for
benchmark tests) and exist only inside these namespaces.

Everything made here is named `rsmh<pid>-...` and removed by `Hosts.close()`, which a fixture
calls in a `finally` and `atexit` calls too; namespaces left by a test run that was killed
outright are removed by the next one (its pid is gone).
"""

from __future__ import annotations

import atexit
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

NET = "198.18.0"  # RFC 2544 block: only ever assigned inside the test's namespaces
PREFIX = "rsmh"
RAY = str(Path(sys.executable).parent / "ray")
GCS_PORT = 6379


def unavailable(probe: bool = True) -> str | None:
    """Why this machine cannot run the multi-host tests (None if it can). With `probe`, also
    makes (and removes) a namespace with a bridge in it: root in a container may lack the right."""
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    for tool in ("ip", "unshare", "mount"):
        if not shutil.which(tool):
            return f"needs `{tool}` (iproute2 / util-linux)"
    if not probe:
        return None
    probe = f"{PREFIX}{os.getpid()}-probe"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:  # e.g. an unprivileged container: no CAP_SYS_ADMIN / CAP_NET_ADMIN
        return f"cannot make a network namespace: {made.stderr.strip()}"
    try:
        link = subprocess.run(["ip", "-n", probe, "link", "add", "b0", "type", "bridge"],
                              capture_output=True, text=True)
        if link.returncode != 0:
            return f"cannot make a bridge in a network namespace: {link.stderr.strip()}"
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _run(*cmd: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def _namespaces() -> list[str]:
    out = _run("ip", "netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def ns_pids(ns: str) -> list[int]:
    """Every process whose network namespace is `ns` (what `ip netns pids` finds)."""
    out = _run("ip", "netns", "pids", ns, check=False).stdout
    return [int(p) for p in out.split() if p.isdigit()]


def kill_namespace(ns: str, timeout_s: float = 15.0) -> list[int]:
    """SIGKILL every process of `ns`, as a host losing power would: no process gets to say
    goodbye. Returns the pids killed, once they are gone (reaped, or zombies of their parent)."""
    killed: list[int] = []
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        pids = [p for p in ns_pids(ns) if p != os.getpid()]
        live = [p for p in pids if _alive(p)]
        if not live:
            return killed
        for pid in live:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            except ProcessLookupError:
                pass
        time.sleep(0.1)
    raise RuntimeError(f"processes of namespace {ns} outlived SIGKILL: {ns_pids(ns)}")


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def remove_stale() -> list[str]:
    """Remove namespaces this module made in runs whose process is gone (killed outright)."""
    removed = []
    for ns in _namespaces():
        m = re.fullmatch(rf"{PREFIX}(\d+)-\w+", ns)
        if m and not Path(f"/proc/{m.group(1)}").exists():
            kill_namespace(ns)
            _run("ip", "netns", "del", ns, check=False)
            removed.append(ns)
    return removed


@dataclass(frozen=True)
class Host:
    name: str  # short: "head", "w1"
    ns: str  # the network namespace
    ip: str

    def cmd(self, *args: str, hide: str | None = None) -> list[str]:
        """`args` run inside this host; with `hide`, in a mount namespace of its own where
        an empty tmpfs covers that path (a host that does not mount the shared storage)."""
        if hide is None:
            return ["ip", "netns", "exec", self.ns, *args]
        # unshare -m makes the new mounts private: the tmpfs is seen by this host's processes only.
        script = 'mount -t tmpfs -o size=1m rsmh-hidden "$0" && exec "$@"'
        return ["ip", "netns", "exec", self.ns, "unshare", "-m", "sh", "-c", script, hide, *args]


class Hosts:
    """Network namespaces on one bridge: `add("w1")` makes a host with the next address."""

    def __init__(self):
        remove_stale()
        self.tag = f"{PREFIX}{os.getpid()}"
        self.bridge = f"{self.tag}-br"
        self.hosts: dict[str, Host] = {}
        self._closed = False
        atexit.register(self.close)
        _run("ip", "netns", "add", self.bridge)
        _run("ip", "-n", self.bridge, "link", "add", "br0", "type", "bridge")
        _run("ip", "-n", self.bridge, "link", "set", "br0", "up")

    def add(self, name: str) -> Host:
        host = Host(name, f"{self.tag}-{name}", f"{NET}.{len(self.hosts) + 1}")
        _run("ip", "netns", "add", host.ns)
        self.hosts[name] = host
        # Both ends are made inside namespaces: the root namespace never holds either.
        veth = f"v{len(self.hosts)}"
        _run("ip", "-n", self.bridge, "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", host.ns)
        _run("ip", "-n", self.bridge, "link", "set", veth, "master", "br0", "up")
        _run("ip", "-n", host.ns, "addr", "add", f"{host.ip}/24", "dev", "eth0")
        _run("ip", "-n", host.ns, "link", "set", "eth0", "up")
        _run("ip", "-n", host.ns, "link", "set", "lo", "up")  # Ray's processes also talk on 127.0.0.1
        return host

    def kill(self, name: str) -> list[int]:
        return kill_namespace(self.hosts[name].ns)

    def close(self) -> None:
        """Kill every process of every host, then remove the namespaces (and with the bridge's
        namespace the bridge and the veth pairs). Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        for host in self.hosts.values():
            try:
                kill_namespace(host.ns)
            except RuntimeError as err:
                print(f"multihost cleanup: {err}", file=sys.stderr)
        for ns in [h.ns for h in self.hosts.values()] + [self.bridge]:
            _run("ip", "netns", "del", ns, check=False)

    def names(self) -> list[str]:
        """The namespaces of this run that still exist."""
        return [ns for ns in _namespaces() if ns.startswith(f"{self.tag}-")]


class RayHosts:
    """A Ray cluster over `Hosts`: a head with no CPUs (it runs no trial) and workers started
    with `ray start --address <head>:6379`, all with the environment `env` (token auth)."""

    def __init__(self, hosts: Hosts, env: dict[str, str], temp_dir: Path):
        self.hosts, self.env, self.temp_dir = hosts, env, temp_dir
        self.head: Host | None = None

    @property
    def address(self) -> str:
        assert self.head is not None
        return f"{self.head.ip}:{GCS_PORT}"

    def _start(self, host: Host, *args: str, hide: str | None = None) -> None:
        proc = subprocess.run(host.cmd(RAY, "start", *args, hide=hide), env=self.env, capture_output=True,
                              text=True, timeout=180)
        if proc.returncode != 0:
            raise RuntimeError(f"`ray start` on {host.name} ({host.ip}) exited {proc.returncode}:\n"
                               f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")

    def start_head(self, name: str = "head") -> Host:
        self.head = self.hosts.add(name)
        # With its dashboard, as `ray start --head` has by default: Ray Train's placement-group
        # cleaner asks the State API (served by the dashboard) whether a trial's controller still
        # lives. Without it, the worker placement group of a controller lost with its host was
        # never removed: Ray moved it onto the surviving worker, where it held the CPU the
        # trial's retry waited for, for ever.
        self._start(self.head, "--head", f"--port={GCS_PORT}", f"--node-ip-address={self.head.ip}",
                    "--num-cpus=0", "--num-gpus=0", "--object-store-memory=200000000",
                    "--include-dashboard=true", "--disable-usage-stats", f"--temp-dir={self.temp_dir}")
        return self.head

    def add_worker(self, name: str, *, cpus: int = 1, hide: str | None = None) -> Host:
        host = self.hosts.add(name)
        self._start(host, *self._worker_args(host, cpus), hide=hide)
        return host

    def _worker_args(self, host: Host, cpus: int) -> list[str]:
        return [f"--address={self.address}", f"--node-ip-address={host.ip}", f"--num-cpus={cpus}",
                "--num-gpus=0", "--object-store-memory=200000000", "--disable-usage-stats"]

    def add_workers(self, names: list[str], *, cpus: int = 1) -> list[Host]:
        # One at a time: two `ray start`s at once on one file system (the session directory
        # the nodes share here) timed out waiting for their raylets.
        return [self.add_worker(n, cpus=cpus) for n in names]

    def nodes(self, expect: int, timeout_s: float = 60.0) -> dict[str, dict]:
        """Ray's own view of the cluster, once `expect` nodes are alive: node id -> {"ip",
        "alive", "cpus"}, from `ray.nodes()` in a driver on the head host."""
        code = ("import json, time, ray\n"
                f"ray.init(address='{self.address}', log_to_driver=False, logging_level='ERROR')\n"
                f"deadline = time.time() + {timeout_s}\n"
                "while True:\n"
                "    nodes = ray.nodes()\n"
                f"    if sum(n['Alive'] for n in nodes) >= {expect} or time.time() > deadline: break\n"
                "    time.sleep(0.5)\n"
                "print(json.dumps({n['NodeID']: {'ip': n['NodeManagerAddress'], 'alive': n['Alive'],\n"
                "                  'cpus': n['Resources'].get('CPU', 0)} for n in nodes}))\n")
        proc = subprocess.run(self.head.cmd(sys.executable, "-c", code), env=self.env, capture_output=True,
                              text=True, timeout=timeout_s + 60)
        if proc.returncode != 0:
            raise RuntimeError(f"ray.nodes() on the head failed:\n{proc.stderr[-3000:]}")
        return json.loads(proc.stdout.strip().splitlines()[-1])

    def popen(self, host: Host, *args: str, **kwargs) -> subprocess.Popen:
        """A process on `host` (e.g. the sweep's driver) with the cluster's environment."""
        return subprocess.Popen(host.cmd(*args), env=self.env, **kwargs)
