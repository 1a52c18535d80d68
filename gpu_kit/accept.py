"""The GPU kit's acceptance run, stage by stage: what run.sh calls between its time boxes.

    python gpu_kit/accept.py installed PIP_CHECK SITE    versions, and pip check's word on the kit's packages
    python gpu_kit/accept.py cuda-check                  exit 2 with one line unless torch sees CUDA
    python gpu_kit/accept.py preflight                   the sweep's CUDA probe on this node (JSON)
    python gpu_kit/accept.py synth OUT [--classes ...]   a mini-ImageNet-shaped JPEG set, in parallel
    python gpu_kit/accept.py prepared LOG                prepare's figures, from the cache it names
    python gpu_kit/accept.py sweep EXP_DIR               every trial's speed, overheads and memory
    python gpu_kit/accept.py project OUTDIR              the default sweep's wall time, projected
    python gpu_kit/accept.py record NAME RC SECONDS BUDGET LOG OUTDIR   NAME.json for a stage
    python gpu_kit/accept.py final OUTDIR                one JSON line with every stage's figures

Each figure-making command prints one JSON object as its last line; `record` keeps it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
STAGES = ("install", "gpu", "synth", "prepare", "sweep", "project")


def _module(*names: str):
    """The first of `names` that imports: raysweep's modules are moving into layers (issue 23)."""
    import importlib

    for name in names:
        try:
            return importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name != name and not name.startswith(str(err.name) + "."):
                raise
    raise ModuleNotFoundError(f"none of {names}")


def _gpu_module():
    return _module("raysweep.cluster.gpu", "raysweep.gpu")


def json_lines(text: str) -> list[dict]:
    """Every line of `text` that is a JSON object, in order."""
    found = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                found.append(json.loads(line))
            except ValueError:
                continue
    return found


# --- installing -------------------------------------------------------------------------

def installed(pip_check: Path, site: Path) -> dict:
    """What the install gave: versions, and pip check's complaints about raysweep or a kit
    package (a node package outside pyproject.toml's ranges shows up here)."""
    from importlib.metadata import distributions, version

    norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()  # noqa: E731
    ours = {norm(d.metadata["Name"]) for d in distributions(path=[str(site)])}
    lines = [line for line in pip_check.read_text().splitlines() if line.strip() and "No broken" not in line]
    bad = [line for line in lines if norm(line.split()[0]) in ours]
    out = {"python": sys.version.split()[0], "kit_packages": len(ours), "pip_check_problems": bad,
           "pip_check_other_lines": len(lines) - len(bad)}
    for name in ("raysweep", "ray", "torch", "torchvision", "numpy", "pandas", "pyarrow"):
        out[name] = version(name)
    if bad:
        out["error"] = f"{len(bad)} requirement(s) of raysweep or the kit's packages unmet (pip check)"
    return out


# --- (a) CUDA -----------------------------------------------------------------------------

def cuda_check() -> int:
    import torch

    if torch.cuda.is_available():
        return 0
    reason, fix = _gpu_module().no_cuda_reason(torch)
    print(f"run.sh: no CUDA device for {sys.executable}'s torch {torch.__version__}: {reason} ({fix}); "
          "on a CPU, `run.sh --cpu-smoke OUTDIR` runs every stage at toy sizes")
    return 2


def preflight() -> int:
    t0 = time.perf_counter()
    probe = _gpu_module().probe_cuda(bf16=True)
    print(json.dumps({**probe, "seconds": round(time.perf_counter() - t0, 2)}))
    return 0


# --- (b) data -----------------------------------------------------------------------------

def _shard(job: dict) -> int:
    """Write one shard: images rendered at 1/scale and upscaled (the render's numpy work is
    what costs, ~10x the JPEG encode at full size), then encoded at their full, varied size."""
    from PIL import Image

    syn = _module("raysweep.data.synthetic", "raysweep.synthetic")
    rng = np.random.default_rng(job["seed"])
    names, classes, scale, grain = job["names"], len(job["names"]), job["scale"], 12
    rows = []
    for i, label in enumerate(job["labels"]):
        w, h = syn._size(rng, (120, 500))  # ImageNet's sizes, as the generator draws them
        small = syn.render(int(label), classes, (max(8, w // scale), max(8, h // scale)), rng)
        # Full-resolution grain, so the JPEGs carry a photo's entropy (decode cost) rather than
        # an upscaled image's few bits: ~70 kB at 500x375, about a mini-ImageNet file's size.
        pixels = np.asarray(small.resize((w, h), Image.BILINEAR), dtype=np.int16)
        pixels += rng.integers(-grain, grain + 1, size=pixels.shape, dtype=np.int16)
        img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
        data = syn.encode(img, "RGB-JPEG", rng)
        rows.append((data, f"{names[label]}_{job['first'] + i:05d}.JPEG", int(label)))
    return syn.write_split(Path(job["path"]), rows, names)


def synth(out: Path, classes: int, per_class: dict[str, int], seed: int, workers: int, shard_rows: int,
          scale: int) -> dict:
    syn = _module("raysweep.data.synthetic", "raysweep.synthetic")
    where = out / "data"
    where.mkdir(parents=True, exist_ok=True)
    names = syn.class_names(classes, seed)
    jobs = []
    for s, (split, n) in enumerate(per_class.items()):
        labels = np.random.default_rng([seed, s]).permutation(np.repeat(np.arange(classes), n))
        shards = max(1, -(-len(labels) // shard_rows))
        for k, part in enumerate(np.array_split(labels, shards)):
            jobs.append({"path": str(where / f"{split}-{k:05d}-of-{shards:05d}.parquet"), "names": names,
                         "labels": part.tolist(), "seed": [seed, s, k], "scale": scale,
                         "first": sum(len(p) for p in np.array_split(labels, shards)[:k])})
    t0 = time.perf_counter()
    with ProcessPoolExecutor(max_workers=workers) as pool:
        images = sum(pool.map(_shard, jobs))
    seconds = time.perf_counter() - t0
    size = sum(f.stat().st_size for f in where.glob("*.parquet"))
    return {"images": images, "classes": classes, "per_class": per_class, "files": len(jobs),
            "workers": workers, "render_scale": scale, "bytes": size, "seconds": round(seconds, 2),
            "images_per_sec": round(images / seconds, 1)}


def prepared(log: Path) -> dict:
    """prepare's own figures (meta.json of the cache its last line names)."""
    found = re.findall(r"^cache:\s+(\S.*)$", log.read_text(), flags=re.M)
    if not found:
        return {"error": f"no 'cache:' line in {log}"}
    meta = json.loads((Path(found[-1].strip()) / "meta.json").read_text())
    return {"decoded": meta.get("decoded"), "seconds": meta.get("seconds"), "images_per_sec": meta.get("images_per_sec"),
            "cpus": os.cpu_count(), "counts": {s: i["count"] for s, i in meta["splits"].items()},
            "image_size": meta.get("image_size"), "cache": found[-1].strip()}


# --- (b) the sweep ------------------------------------------------------------------------

def _med(xs):
    xs = [x for x in xs if x is not None]
    return round(statistics.median(xs), 4) if xs else None


def trial_figures(rows: list[dict]) -> dict:
    """One trial's speed, per-epoch overhead, start-up, checkpoints and memory, from its epochs."""
    rows = sorted(rows, key=lambda m: m.get("epoch", 0))
    last = rows[-1]
    g = lambda m, k: m.get(k) or 0.0  # noqa: E731
    overhead = [m["time_epoch_s"] - g(m, "time_train_s") - g(m, "time_eval_s") - g(m, "time_checkpoint_s")
                for m in rows[1:] if "time_epoch_s" in m]  # epoch 1's time_epoch_s holds the start-up
    later = rows[1:] or rows
    out = {"fraction": (last.get("config") or {}).get("fraction"), "seed": (last.get("config") or {}).get("seed"),
           "n_train": last.get("n_train"), "epochs": len(rows),
           "images_per_sec": [m.get("images_per_sec") for m in rows],
           "time_epoch_s": _med([m.get("time_epoch_s") for m in later]),
           "time_train_s": _med([m.get("time_train_s") for m in later]),
           "time_eval_s": _med([m.get("time_eval_s") for m in later]),
           "overhead_s_median": _med(overhead), "overhead_s_max": round(max(overhead), 4) if overhead else None,
           "checkpoints": sum(bool(m.get("checkpointed")) for m in rows),
           "time_checkpoint_s": [m.get("time_checkpoint_s") for m in rows if m.get("checkpointed")],
           "time_test_s": last.get("time_test_s"), "wall_time_s": last.get("wall_time_s"),
           "val_top5_error": last.get("val_top5_error"), "test_top5_error": last.get("test_top5_error")}
    for k in ("time_setup_s", "time_launch_s", "time_startup_s", "time_data_load_s", "time_to_first_step_s"):
        out[k] = rows[0].get(k)
    peak, est = last.get("gpu_peak_bytes"), last.get("gpu_estimate_bytes")
    out.update(gpu_peak_bytes=peak, gpu_estimate_bytes=est,
               gpu_peak_over_estimate=round(peak / est, 3) if peak and est else None,
               node_ip=last.get("node_ip"))
    return out


def sweep(exp: Path) -> dict:
    trials = []
    for result in sorted(exp.glob("*/result.json")):
        rows = [json.loads(line) for line in result.read_text().splitlines() if line.strip()]
        if rows:
            trials.append(trial_figures(rows))
    trials.sort(key=lambda t: -(t["fraction"] or 0))
    summary = json.loads((exp / "summary.json").read_text()) if (exp / "summary.json").exists() else []
    return {"experiment": str(exp), "trials": trials,
            "statuses": {str(r.get("fraction")): r.get("status") for r in summary}}


# --- (c) the projection -------------------------------------------------------------------

def _interp(n: float, points: list[tuple[float, float]]) -> float:
    """Linear in n through the measured (n, value) points, flat beyond them."""
    points = sorted(points)
    if len(points) == 1 or n <= points[0][0]:
        return points[0][1]
    for (n0, v0), (n1, v1) in zip(points, points[1:]):
        if n <= n1:
            return v0 + (v1 - v0) * (n - n0) / (n1 - n0)
    return points[-1][1]


def project(outdir: Path, config: Path, readme: Path) -> dict:
    """The default sweep (its fractions x seeds x epochs) from the measured trials: a trial costs
    its start-up (to the first step) + epochs x (train time per image x n + eval + overhead +
    checkpoint) + its test, each interpolated in n between the measured fractions."""
    stage = json.loads((outdir / "sweep.json").read_text()).get("figures") or {}
    trials = [t for t in stage.get("trials", []) if t.get("time_train_s") and t.get("n_train")]
    if not trials:
        return {"error": "no measured trial in sweep.json to project from"}
    from raysweep.config import load_config

    cfg = load_config(config)
    fractions, seeds, epochs = cfg.sweep.fractions, cfg.sweep.seeds, cfg.train.epochs
    full = max(t["n_train"] / t["fraction"] for t in trials)
    per_image = statistics.median(t["time_train_s"] / t["n_train"] for t in trials)  # unrounded: ~5e-5 s
    pts = lambda key: [(t["n_train"], t[key] or 0.0) for t in trials]  # noqa: E731
    ckpt = [(t["n_train"], sum(x or 0 for x in t["time_checkpoint_s"]) / max(1, t["epochs"])) for t in trials]
    rows, total, busy = [], 0.0, 0.0
    for f in fractions:
        n = round(f * full)
        epoch = per_image * n + _interp(n, pts("time_eval_s")) + _interp(n, pts("overhead_s_median")) + _interp(n, ckpt)
        trial = _interp(n, pts("time_to_first_step_s")) + epochs * epoch + _interp(n, pts("time_test_s"))
        rows.append({"fraction": f, "n_train": n, "epoch_s": round(epoch, 2), "trial_s": round(trial, 1)})
        total += trial * len(seeds)
        busy += (per_image * n + _interp(n, pts("time_eval_s"))) * epochs * len(seeds)
    paper = [int(m) for m in re.findall(r"about (\d+) minutes one trial at a time", readme.read_text())]
    out = {"trials": len(fractions) * len(seeds), "epochs": epochs, "per_fraction": rows,
           "serial_s": round(total, 1), "serial_min": round(total / 60, 1),
           "gpu_busy_min": round(busy / 60, 1), "train_s_per_image": per_image,
           "readme_paper_estimate_min": paper[-1] if paper else None}
    print(f"projection: the default sweep ({out['trials']} trials x {epochs} epochs) one trial at a time: "
          f"{out['serial_min']} min measured-and-projected (training + evaluation alone: {out['gpu_busy_min']} min), "
          f"beside the README's paper estimate of {out['readme_paper_estimate_min']} min", flush=True)
    return out


# --- bookkeeping --------------------------------------------------------------------------

def record(name: str, rc: int, seconds: float, budget: float, log: Path, outdir: Path) -> None:
    """NAME.json: how the stage ended and its figures (the last JSON line of its log)."""
    status = "ok" if rc == 0 else "timeout" if rc in (124, 137) else "failed"
    text = log.read_text(errors="replace") if log.exists() else ""
    objects = json_lines(text)
    rec = {"stage": name, "status": status, "rc": rc, "seconds": round(seconds, 1), "budget_s": budget,
           "figures": objects[-1] if objects else None}
    if len(objects) > 1:  # e.g. the CUDA preflight before bench gpu's own line
        rec["earlier"] = objects[:-1]
    if status != "ok":
        rec["tail"] = text.strip().splitlines()[-5:]
    tmp = outdir / f".{name}.json.tmp"
    tmp.write_text(json.dumps(rec, indent=1) + "\n")
    tmp.replace(outdir / f"{name}.json")


def final(outdir: Path) -> int:
    stages = {}
    for name in STAGES:
        path = outdir / f"{name}.json"
        stages[name] = json.loads(path.read_text()) if path.exists() else {"stage": name, "status": "not run"}
    result = {"kit": json.loads((outdir / "kit.json").read_text()) if (outdir / "kit.json").exists() else None,
              "ok": all(s["status"] == "ok" for s in stages.values()),
              "seconds": round(sum(s.get("seconds", 0) for s in stages.values()), 1),
              "budget_s": sum(s.get("budget_s", 0) for s in stages.values()), "stages": stages}
    (outdir / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, separators=(",", ":")))
    return 0 if result["ok"] else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gpu_kit/accept.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("cuda-check")
    sub.add_parser("preflight")
    s = sub.add_parser("installed")
    s.add_argument("pip_check", type=Path)
    s.add_argument("site", type=Path)
    s = sub.add_parser("synth")
    s.add_argument("out", type=Path)
    s.add_argument("--classes", type=int, default=100)
    s.add_argument("--per-class", type=int, nargs=3, default=[500, 100, 50], metavar=("TRAIN", "VAL", "TEST"))
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--workers", type=int, default=os.cpu_count())
    s.add_argument("--shard-rows", type=int, default=1000)
    s.add_argument("--render-scale", type=int, default=4)
    s = sub.add_parser("prepared")
    s.add_argument("log", type=Path)
    s = sub.add_parser("sweep")
    s.add_argument("exp", type=Path)
    s = sub.add_parser("project")
    s.add_argument("outdir", type=Path)
    s.add_argument("--config", type=Path, default=ROOT / "configs" / "default.yaml")
    s.add_argument("--readme", type=Path, default=ROOT / "README.md")
    s = sub.add_parser("record")
    for arg in ("name", "rc", "seconds", "budget", "log", "outdir"):
        s.add_argument(arg)
    s = sub.add_parser("final")
    s.add_argument("outdir", type=Path)
    a = p.parse_args(argv)
    if a.cmd == "cuda-check":
        return cuda_check()
    if a.cmd == "preflight":
        return preflight()
    if a.cmd == "record":
        record(a.name, int(a.rc), float(a.seconds), float(a.budget), Path(a.log), Path(a.outdir))
        return 0
    if a.cmd == "final":
        return final(a.outdir)
    if a.cmd == "synth":
        out = synth(a.out, a.classes, dict(zip(("train", "validation", "test"), a.per_class)), a.seed,
                    a.workers, a.shard_rows, a.render_scale)
    elif a.cmd == "installed":
        out = installed(a.pip_check, a.site)
    elif a.cmd == "prepared":
        out = prepared(a.log)
    elif a.cmd == "sweep":
        out = sweep(a.exp)
    else:
        out = project(a.outdir, a.config, a.readme)
    print(json.dumps(out))
    return 1 if "error" in out else 0


if __name__ == "__main__":
    raise SystemExit(main())
