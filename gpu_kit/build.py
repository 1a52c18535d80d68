"""`make gpu-kit`: everything an offline GPU node with its own PyTorch needs to run raysweep, in one folder.

    python gpu_kit/build.py [--python-version 3.12] [--out dist/gpu-kit]

The kit holds the project at HEAD (source tree and wheel), Ray's wheel slimmed to what a sweep
runs, as a tar.xz, the wheels of every other runtime dependency that the node lacks (the node's
packages are listed in gpu_kit/target-installed.txt), and run.sh. Versions come from
constraints.txt; wheels are for CPython GPU_KIT_PYTHON on manylinux x86-64. It refuses to
write a kit over --max-mib (60 MiB: what one command may copy to the node, with room to spare).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parent.parent
KIT_SRC = Path(__file__).resolve().parent
MIB = 1024 * 1024
# manylinux_2_28 covers the node (glibc 2.35+); the older tags are what many wheels carry.
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"]
# Parts of Ray's wheel a sweep never loads (measured for 2.60's cp312 wheel: 201 MB unpacked,
# 147 MB without these): Java jars, RLlib, Serve, the LLM libraries, and the dashboard's web UI
# (its server still starts: it needs only index.html, favicon.ico and a static/ folder).
RAY_DROP = ["ray/jars", "ray/rllib", "ray/serve", "ray/llm"]
RAY_UI = "ray/dashboard/client/build"
RAY_UI_KEEP = {"index.html", "favicon.ico"}


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    print("+", " ".join(str(c) for c in cmd), flush=True)
    return subprocess.run([str(c) for c in cmd], check=True, **kw)


def target_installed(path: Path) -> set[str]:
    names = set()
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.add(canonicalize_name(line))
    return names


def runtime_requirements() -> list[str]:
    import tomllib

    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]


def pip_target_args(python_version: str) -> list[str]:
    return ["--only-binary=:all:", "--implementation", "cp", "--python-version", python_version,
            *[a for p in PLATFORMS for a in ("--platform", p)]]


def resolve(reqs: list[str], python_version: str, work: Path) -> dict:
    """pip's resolution of `reqs` for the target (a dry run: only metadata is fetched)."""
    report = work / "resolve.json"
    run([sys.executable, "-m", "pip", "install", "--quiet", "--dry-run", "--ignore-installed",
         "--target", work / "unused", "--report", report, *pip_target_args(python_version),
         "-c", REPO / "constraints.txt", *reqs])
    return {canonicalize_name(i["metadata"]["name"]): i for i in json.loads(report.read_text())["install"]}


def missing_closure(reqs: list[str], resolved: dict, installed: set[str], python_version: str) -> dict[str, str]:
    """name -> version of what the node lacks: the requirements' dependency graph, entered at
    `reqs` and not descended below a package the node has (its own dependencies are its business)."""
    env = {"python_version": python_version, "python_full_version": f"{python_version}.0",
           "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
           "os_name": "posix", "implementation_name": "cpython", "platform_python_implementation": "CPython"}
    need: dict[str, str] = {}
    todo = [(Requirement(r), "") for r in reqs]
    seen: set[tuple[str, str]] = set()
    while todo:
        req, extra = todo.pop()
        if req.marker and not req.marker.evaluate({**env, "extra": extra}):
            continue
        name = canonicalize_name(req.name)
        if name in installed:
            continue
        item = resolved[name]
        need[name] = item["metadata"]["version"]
        for ex in [""] + sorted(req.extras):
            if (name, ex) in seen:
                continue
            seen.add((name, ex))
            todo += [(Requirement(r), ex) for r in item["metadata"].get("requires_dist", [])]
    return need


def slim_ray(wheel: Path, out: Path) -> dict:
    """Ray's wheel without RAY_DROP and the web UI, as a tar.xz of what the wheel unpacks to
    (RECORD rewritten to the files kept)."""
    with tempfile.TemporaryDirectory(prefix="gpu-kit-ray-") as tmp:
        root = Path(tmp)
        with zipfile.ZipFile(wheel) as zf:
            for info in zf.infolist():  # extractall drops the mode: gcs_server and raylet must stay executable
                path = Path(zf.extract(info, root))
                if info.external_attr >> 16:
                    path.chmod((info.external_attr >> 16) & 0o777)
        full = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
        for part in RAY_DROP:
            shutil.rmtree(root / part)
        ui = root / RAY_UI
        for entry in ui.iterdir():
            if entry.name not in RAY_UI_KEEP:
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        (ui / "static").mkdir()
        (record,) = root.glob("ray-*.dist-info/RECORD")
        kept = [line for line in record.read_text().splitlines()
                if (root / line.split(",", 1)[0]).is_file() or line.split(",", 1)[0].endswith("RECORD")]
        record.write_text("\n".join(kept) + "\n")
        slim = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
        with lzma.open(out, "wb", preset=6) as xz, tarfile.open(fileobj=xz, mode="w") as tar:
            for entry in sorted(root.iterdir()):
                tar.add(entry, arcname=entry.name)
    return {"wheel_bytes": wheel.stat().st_size, "unpacked_bytes": full, "slim_unpacked_bytes": slim,
            "tar_xz_bytes": out.stat().st_size, "dropped": RAY_DROP + [f"{RAY_UI} (all but {sorted(RAY_UI_KEEP)})"]}


def cached_slim_ray(version: str, python_version: str, out_dir: Path, cache: Path) -> tuple[Path, dict]:
    """Ray's slim tar.xz, built once per wheel (xz takes minutes on 2 cores)."""
    cache.mkdir(parents=True, exist_ok=True)
    wheels = cache / "ray-wheel"
    run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", *pip_target_args(python_version),
         "-d", wheels, f"ray=={version}"])
    tag = f"cp{python_version.replace('.', '')}"
    (wheel,) = [w for w in wheels.glob(f"ray-{version}-*.whl") if f"-{tag}-" in w.name]
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()[:16]
    name = f"ray-{version}-{tag}-slim.tar.xz"
    slim, info_path = cache / f"{digest}-v2-{name}", cache / f"{digest}-v2-{name}.json"  # v2: modes kept
    if not (slim.exists() and info_path.exists()):
        info = slim_ray(wheel, slim.with_suffix(".tmp"))
        slim.with_suffix(".tmp").replace(slim)
        info_path.write_text(json.dumps(info))
    shutil.copy(slim, out_dir / name)
    return out_dir / name, json.loads(info_path.read_text())


def project(out: Path, work: Path) -> str:
    """The project at HEAD: its source tree as a tarball and a wheel built from that tree."""
    commit = run(["git", "-C", REPO, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = run(["git", "-C", REPO, "status", "--porcelain", "--untracked-files=no"],
                capture_output=True, text=True).stdout.strip()
    if dirty:
        print(f"gpu-kit: note: uncommitted changes are not in the kit (it holds HEAD, {commit[:12]})", flush=True)
    run(["git", "-C", REPO, "archive", "--format=tar.gz", "--prefix=raysweep/", "-o", out / "raysweep-src.tar.gz", "HEAD"])
    tree = work / "tree"
    tree.mkdir()
    with tarfile.open(out / "raysweep-src.tar.gz") as tar:
        tar.extractall(tree, filter="data")
    run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", out / "wheels", tree / "raysweep"])
    return commit


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gpu_kit/build.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--python-version", default=os.environ.get("GPU_KIT_PYTHON", "3.12"), help="the node's Python (X.Y)")
    p.add_argument("--out", type=Path, default=REPO / "dist" / "gpu-kit")
    p.add_argument("--installed", type=Path, default=KIT_SRC / "target-installed.txt",
                   help="the node's packages (one name a line)")
    p.add_argument("--cache", type=Path, default=REPO / ".cache" / "gpu-kit")
    p.add_argument("--max-mib", type=float, default=60.0)
    a = p.parse_args(argv)
    if not re.fullmatch(r"3\.\d+", a.python_version):
        raise SystemExit(f"gpu-kit: --python-version must look like 3.12, got {a.python_version!r}")
    out = a.out.resolve()
    shutil.rmtree(out, ignore_errors=True)
    (out / "wheels").mkdir(parents=True)
    installed = target_installed(a.installed)
    with tempfile.TemporaryDirectory(prefix="gpu-kit-") as tmp:
        work = Path(tmp)
        commit = project(out, work)
        # Only what the node lacks enters the resolution: its own torch is never asked for.
        reqs = [r for r in runtime_requirements() if canonicalize_name(Requirement(r).name) not in installed]
        need = missing_closure(reqs, resolve(reqs, a.python_version, work), installed, a.python_version)
    ray_version = need.pop("ray")
    ray_file, ray_info = cached_slim_ray(ray_version, a.python_version, out, a.cache)
    run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", *pip_target_args(a.python_version),
         "-d", out / "wheels", *[f"{n}=={v}" for n, v in sorted(need.items())]])
    shutil.copy(KIT_SRC / "run.sh", out / "run.sh")
    (out / "run.sh").chmod(0o755)
    files = {str(f.relative_to(out)): f.stat().st_size for f in sorted(out.rglob("*")) if f.is_file()}
    total = sum(files.values()) + 4096  # + the manifest itself
    manifest = {"commit": commit, "python": a.python_version, "platforms": PLATFORMS,
                "ray": {"version": ray_version, "file": ray_file.name, **ray_info},
                "wheels": {n: v for n, v in sorted(need.items())}, "target_installed": sorted(installed),
                "files": files, "total_bytes": total}
    (out / "MANIFEST.json").write_text(json.dumps(manifest, indent=1) + "\n")
    for name, size in files.items():
        print(f"{size / MIB:9.2f} MiB  {name}")
    print(f"gpu-kit: {out} {total / MIB:.1f} MiB in {len(files) + 1} files (Python {a.python_version}, commit {commit[:12]})")
    if total > a.max_mib * MIB:
        print(f"gpu-kit: {total / MIB:.1f} MiB is over the {a.max_mib:g} MiB limit", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
