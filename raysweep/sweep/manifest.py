"""manifest.json: what it takes to trust and reproduce a sweep, written atomically into the
experiment directory when the sweep starts and completed when it ends.

It holds the command line, the resolved config and its hash, the project's git commit (and
whether the tree was dirty), package versions, the machine (OS, CPU, GPUs), the data (source,
fingerprint, prepare cache key, per-split counts), the model, and start/end/wall times. A
resumed sweep appends an attempt: the first start is never lost. Cheap by design: no torch
import (versions come from package metadata), git and nvidia-smi run with short timeouts.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

from raysweep.console import python_command
from raysweep.errors import RaysweepError
from raysweep.io import atomic_write_json

FILE = "manifest.json"
PACKAGES = ["raysweep", "ray", "torch", "torchvision", "numpy", "pyarrow", "pandas", "scipy"]
PROJECT_ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_S = 3.0


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def config_hash(cfg_dict: dict) -> str:
    """sha256 of the config as canonical JSON (sorted keys): equal configs, equal hashes."""
    text = json.dumps(cfg_dict, sort_keys=True, separators=(",", ":"), default=str)
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def _run(cmd: list[str], cwd: Path | None = None) -> str | None:
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout if proc.returncode == 0 else None


def git_state(root: Path | None = None) -> dict:
    """The commit the code runs from (`root`, default the project's folder) and whether its tree
    has uncommitted changes; outside a checkout (an installed wheel, a copied tree) both are None
    and `reason` says why."""
    root = root or PROJECT_ROOT
    if shutil.which("git") is None:
        return {"commit": None, "dirty": None, "reason": "git is not installed"}
    commit = _run(["git", "-C", str(root), "rev-parse", "HEAD"])
    if commit is None:
        return {"commit": None, "dirty": None, "reason": f"{root} is not a git checkout"}
    status = _run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"])
    return {"commit": commit.strip(), "dirty": None if status is None else bool(status.strip()),
            "reason": None}


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def gpus() -> tuple[list[dict], str | None]:
    """Each GPU's name, memory, driver and CUDA version from nvidia-smi; ([], why) without one."""
    if shutil.which("nvidia-smi") is None:
        return [], "nvidia-smi not found"
    rows = _run(["nvidia-smi", "--query-gpu=index,name,memory.total,driver_version",
                 "--format=csv,noheader,nounits"])
    if rows is None:
        return [], "nvidia-smi failed"
    header = _run(["nvidia-smi"]) or ""
    cuda = next((line.split("CUDA Version:")[1].split()[0] for line in header.splitlines()
                 if "CUDA Version:" in line), None)
    out = []
    for row in rows.strip().splitlines():
        index, name, memory, driver = (c.strip() for c in row.split(",", 3))
        out.append({"index": int(index), "name": name, "memory_mib": int(float(memory)), "driver": driver,
                    "cuda": cuda})
    return out, None


def environment() -> dict:
    """Python and package versions, the OS, the CPU and the GPUs of the machine this runs on."""
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    found, why = gpus()
    return {"versions": versions, "os": platform.platform(), "hostname": platform.node(),
            "cpu_model": _cpu_model(), "cpu_count": os.cpu_count(), "gpus": found, "gpus_reason": why}


def _read(path: Path) -> dict | None:
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise RaysweepError(f"cannot read {path}: {err}; move it away to start a new manifest") from err


def start(exp_dir, *, argv: list[str], cfg_dict: dict, data_info: dict, model_info: dict,
          resources: dict) -> dict:
    """Record the start of a sweep (or of a resumed attempt) in `exp_dir/manifest.json`.

    `argv` is what `python -m raysweep.tune` received (sys.argv[1:]). A first start writes the
    whole manifest; a later one (resume) keeps the original start, config and environment and
    appends an attempt with its own command, config hash, git state and machine.
    """
    exp_dir = Path(exp_dir)
    path = exp_dir / FILE
    command = python_command("-m", "raysweep.tune", *argv)
    attempt = {"started_at": _now(), "started_unix": time.time(), "ended_at": None, "status": "running",
               "wall_time_s": None, "argv": list(argv), "command": command.strip(),
               "config_hash": config_hash(cfg_dict), "git": git_state(), "environment": environment(),
               "resources": resources, "pid": os.getpid()}
    manifest = _read(path)
    if manifest is None:
        manifest = {"manifest_version": 1, "name": exp_dir.name, "command": attempt["command"],
                    "argv": list(argv), "config": cfg_dict, "config_hash": attempt["config_hash"],
                    "git": attempt["git"], "environment": attempt["environment"], "data": data_info,
                    "model": model_info, "resources": resources, "started_at": attempt["started_at"],
                    "ended_at": None, "wall_time_s": None, "status": "running", "trials": None,
                    "attempts": []}
    else:
        manifest["status"] = "running"
    manifest["attempts"].append(attempt)
    atomic_write_json(path, manifest)
    return manifest


def finish(exp_dir, *, status: str, trials: dict) -> dict:
    """Complete the manifest: this attempt's end and wall time, the sweep's status and trial
    counts, and the sweep's wall time summed over its attempts."""
    path = Path(exp_dir) / FILE
    manifest = _read(path)
    if manifest is None or not manifest.get("attempts"):
        raise RaysweepError(f"{path}: no manifest to finish (manifest.start was not called for this sweep)")
    attempt = manifest["attempts"][-1]
    attempt["ended_at"] = _now()
    attempt["wall_time_s"] = round(time.time() - attempt["started_unix"], 3)
    attempt["status"] = status
    manifest.update(status=status, trials=trials, ended_at=attempt["ended_at"],
                    wall_time_s=round(sum(a.get("wall_time_s") or 0.0 for a in manifest["attempts"]), 3))
    atomic_write_json(path, manifest)
    return manifest


if __name__ == "__main__":  # a quick look at what a manifest would record here
    print(json.dumps({"git": git_state(), "environment": environment()}, indent=2))
    sys.exit(0)
