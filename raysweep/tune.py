"""The sweep: `python -m raysweep.tune`, a Ray Tune grid over training fraction x seed.

Each trial is a function that builds and fits a Ray Train `TorchTrainer` (the Train V2
pattern); metrics reach Tune through `TuneReportCallback`. Results, checkpoints and
TensorBoard files live under <storage-path>/<name>; `--resume` continues a stopped sweep.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
from pathlib import Path

from raysweep.cluster import plan_resources, start_or_join
from raysweep.config import Config, add_config_args, config_from_args
from raysweep.errors import RaysweepError, cli_entry
from raysweep.io import atomic_write_json, atomic_write_text

CONFIG_FILE = "raysweep_config.json"
TRAIN_RUNS = "train_runs"
SUMMARY_COLUMNS = [
    "fraction", "seed", "n_train", "status", "epochs_done", "best_epoch", "learned",
    "best_val_top5_error", "val_loss", "val_top1_error", "val_top5_error",
    "test_loss", "test_top1_error", "test_top5_error", "wall_time_s", "trial_id", "error",
]
DRIVER_MEMORY = 256 * 1024**2
PROGRESS_METRICS = ["epoch", "train_loss", "val_top5_error", "test_top5_error"]


def run_trial(params: dict, *, cfg_dict: dict, prepared, plan, train_storage: str) -> None:
    """One Tune trial: build this (fraction, seed)'s TorchTrainer and fit it.

    The Train run is named after the trial id, so a retried or resumed trial finds its
    own checkpoints under the same (storage_path, name) and continues from them.
    """
    import ray.data
    import ray.train
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from raysweep.train import build_trainer, checkpoint_config

    cfg = Config.from_dict(cfg_dict)
    # One progress display for the sweep (Tune's table): per-trial Ray Data bars would flood it.
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    trial_id = ray.tune.get_context().get_trial_id()
    run_config = ray.train.RunConfig(
        name=f"trial_{trial_id}",
        storage_path=train_storage,
        callbacks=[TuneReportCallback()],
        checkpoint_config=checkpoint_config(cfg.sweep.keep_checkpoints),
        failure_config=ray.train.FailureConfig(max_failures=cfg.sweep.max_failures),
    )
    trainer = build_trainer(cfg, prepared, float(params["fraction"]), int(params["seed"]),
                            use_gpu=plan.use_gpu, gpus_per_worker=plan.gpus_per_worker,
                            num_workers=plan.num_workers, run_config=run_config)
    trainer.fit()


def summarize(result_grid) -> list[dict]:
    """One row per trial, from a Tune ResultGrid: the final report plus wall time and status."""
    rows = []
    for result in result_grid:
        m = dict(result.metrics or {})
        cfg = result.config or {}
        finished = result.error is None and "test_top5_error" in m
        row = {
            "fraction": cfg.get("fraction"),
            "seed": cfg.get("seed"),
            "n_train": m.get("n_train"),
            "status": "TERMINATED" if finished else ("ERROR" if result.error else "UNFINISHED"),
            "epochs_done": m.get("epoch"),
            "wall_time_s": m.get("time_total_s"),
            "trial_id": m.get("trial_id") or Path(result.path).name,
            "error": (str(result.error).strip().splitlines() or [""])[-1][:300] if result.error else "",
        }
        for key in SUMMARY_COLUMNS:
            row.setdefault(key, m.get(key))
        rows.append(row)
    rows.sort(key=grid_order)
    return rows


def complete_grid(rows: list[dict], fractions: list[float], seeds: list[int]) -> list[dict]:
    """Add a NOT_STARTED row for each grid point Tune never started (a sweep stopped by Ctrl-C)."""
    seen = {(r["fraction"], r["seed"]) for r in rows}
    missing = [dict.fromkeys(SUMMARY_COLUMNS) | {"fraction": f, "seed": s, "status": "NOT_STARTED"}
               for f in fractions for s in seeds if (f, s) not in seen]
    return sorted(rows + missing, key=grid_order)


def grid_order(row: dict) -> tuple:
    """Largest fraction first, then by seed."""
    return -(row["fraction"] or 0), row["seed"] if row["seed"] is not None else -1


def write_summary(exp_dir: Path, rows: list[dict]) -> None:
    import pandas as pd

    frame = pd.DataFrame(rows, columns=SUMMARY_COLUMNS)
    atomic_write_text(exp_dir / "summary.csv", frame.to_csv(index=False))
    atomic_write_json(exp_dir / "summary.json", rows)


def format_table(rows: list[dict]) -> str:
    import pandas as pd

    cols = ["fraction", "seed", "n_train", "status", "best_epoch", "learned",
            "val_top5_error", "test_top5_error", "wall_time_s"]
    frame = pd.DataFrame(rows, columns=SUMMARY_COLUMNS)[cols]
    return frame.to_string(index=False, float_format=lambda v: f"{v:.4g}")


def _experiment_dir(cfg: Config, args) -> tuple[Path, str]:
    storage = Path(os.path.expanduser(args.storage_path or cfg.sweep.storage_path)).resolve()
    if args.name:
        return storage, args.name
    if args.resume:
        # The newest experiment of this config, so `--resume` alone continues the last sweep.
        candidates = sorted((p for p in storage.glob(f"{cfg.name}-*") if (p / CONFIG_FILE).is_file()),
                            key=lambda p: p.stat().st_mtime)
        if not candidates:
            raise RaysweepError(f"--resume: no experiment named {cfg.name}-* under {storage}; pass --name")
        return storage, candidates[-1].name
    return storage, f"{cfg.name}-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m raysweep.tune",
        description="Run a Ray Tune grid search over training fraction x seed. Each trial trains "
                    "AlexNet from scratch in a Ray Train TorchTrainer on a stratified subset, reports "
                    "train/val loss and top-1/top-5 error every epoch, and ends with the test error "
                    "of its best-validation checkpoint.",
        epilog="examples:\n"
               "  python -m raysweep.tune --num-gpus 4                     # full recipe, mini-ImageNet\n"
               "  python -m raysweep.tune --data /data/mini-imagenet       # a local hub snapshot\n"
               "  python -m raysweep.tune --config configs/demo.yaml      # CPU demo, synthetic data\n"
               "  python -m raysweep.tune --name my-sweep --resume         # continue a stopped sweep\n",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p)
    p.add_argument("--data", metavar="SOURCE",
                   help="HF dataset id (default timm/mini-imagenet), a local parquet directory, or 'synthetic'")
    p.add_argument("--num-gpus", type=int, metavar="N",
                   help="GPUs for the local Ray instance (default: all this machine has); checked against reality")
    p.add_argument("--gpus-per-trial", type=float, metavar="G",
                   help="GPUs per trial: 1, 2, ... = one worker per GPU; 0.5 packs two trials per GPU (default 1)")
    p.add_argument("--fractions", type=float, nargs="+", metavar="F", help="training fractions in (0, 1]")
    p.add_argument("--seeds", type=int, nargs="+", metavar="S", help="seeds (subset, init, augmentation)")
    p.add_argument("--epochs", type=int, metavar="N", help="epochs per trial")
    p.add_argument("--storage-path", metavar="DIR", help="where experiments go (default ./results)")
    p.add_argument("--name", help="experiment name (default: config name + timestamp)")
    p.add_argument("--resume", action="store_true",
                   help="continue the experiment --name (or the newest of this config): errored and "
                        "unfinished trials resume from their checkpoints, finished ones are kept")
    p.add_argument("--address", metavar="ADDR", help="join an existing cluster ('auto' or host:port)")
    p.add_argument("--dashboard-host", default="127.0.0.1",
                   help="interface for the local dashboard (default 127.0.0.1; 0.0.0.0 exposes it)")
    p.add_argument("--quiet", action="store_true", help="no progress table (for tests and scripts)")
    return p


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = config_from_args(args, {
        "data.source": args.data, "sweep.fractions": args.fractions, "sweep.seeds": args.seeds,
        "train.epochs": args.epochs, "sweep.gpus_per_trial": args.gpus_per_trial,
    })
    if args.num_gpus is not None and args.num_gpus < 0:
        raise RaysweepError(f"--num-gpus must be >= 0, got {args.num_gpus}")
    storage, name = _experiment_dir(cfg, args)
    exp_dir = storage / name
    if args.resume:
        if not (exp_dir / CONFIG_FILE).is_file():
            raise RaysweepError(f"--resume: {exp_dir} is not a raysweep experiment (no {CONFIG_FILE})")
        # The stored config wins, so a resumed sweep is the sweep that was started.
        cfg = Config.from_dict(json.loads((exp_dir / CONFIG_FILE).read_text()))
    elif exp_dir.exists() and any(exp_dir.iterdir()):
        raise RaysweepError(f"experiment {exp_dir} already exists: pass --resume to continue it, "
                            "or choose another --name")
    _check_source(cfg)

    t0 = time.time()
    info = start_or_join(address=args.address, num_gpus=args.num_gpus,
                         dashboard_host=args.dashboard_host, quiet=args.quiet)
    plan = plan_resources(cluster_cpus=info["cpus"], cluster_gpus=info["gpus"],
                          gpus_per_trial=cfg.sweep.gpus_per_trial, cpus_per_trial=cfg.sweep.cpus_per_trial,
                          gpus_per_trial_explicit=args.gpus_per_trial is not None,
                          host_cpus=os.cpu_count() if info["local"] else info["max_node_cpus"])
    if not plan.use_gpu and cfg.train.num_threads == 0:
        cfg.train.num_threads = plan.torch_threads
    _print_banner(info, plan, cfg, exp_dir)

    from raysweep.data import prepare_from_config

    prepared = prepare_from_config(cfg.data)
    exp_dir.mkdir(parents=True, exist_ok=True)
    if not args.resume:
        atomic_write_json(exp_dir / CONFIG_FILE, cfg.to_dict())

    results = _fit(cfg, prepared, plan, storage, name, resume=args.resume, quiet=args.quiet)
    rows = complete_grid(summarize(results), cfg.sweep.fractions, cfg.sweep.seeds)
    write_summary(exp_dir, rows)
    wall = time.time() - t0
    print()
    print(format_table(rows))
    bad = [r for r in rows if r["status"] != "TERMINATED"]
    unlearned = [r for r in rows if r["status"] == "TERMINATED" and r.get("learned") is False]
    if bad:
        print(f"\n{len(bad)} of {len(rows)} trial(s) did not finish. Continue the sweep with:\n"
              f"  python -m raysweep.tune --resume --name {name} --storage-path {storage}")
    if unlearned:
        print(f"{len(unlearned)} trial(s) stayed near chance (learned=False); the analysis leaves them "
              "out of the fit unless --include-unlearned.")
    print(f"\nSweep wall time: {wall:.1f} s")
    print(f"Experiment directory: {exp_dir}")
    print(f"Next: python -m analysis.plot_scaling {exp_dir}")
    return 1 if bad else 0


def _check_source(cfg: Config) -> None:
    """Refuse a local --data path that does not exist before anything starts."""
    from raysweep.data.source import looks_like_path

    src = cfg.data.source
    if looks_like_path(src) and not Path(os.path.expanduser(src)).exists():
        raise RaysweepError(f"--data {src}: no such directory")


def _print_banner(info: dict, plan, cfg: Config, exp_dir: Path) -> None:
    if info["local"] and info["dashboard_url"]:
        print(f"Ray dashboard: {info['dashboard_url']}  (token auth: the token is printed by "
              "`ray get-auth-token`; the browser asks for it once)")
    elif info["dashboard_url"]:
        print(f"Joined the Ray cluster; its dashboard: {info['dashboard_url']}")
    grid = len(cfg.sweep.fractions) * len(cfg.sweep.seeds)
    print(f"Sweep {exp_dir.name}: {len(cfg.sweep.fractions)} fractions x {len(cfg.sweep.seeds)} seeds = "
          f"{grid} trials, {cfg.train.epochs} epochs ({cfg.train.budget} budget) on {cfg.data.source}")
    print(f"Resources: {info['cpus']:g} CPUs, {info['gpus']:g} GPUs; {plan.describe()}")
    sys.stdout.flush()


def _fit(cfg: Config, prepared, plan, storage: Path, name: str, *, resume: bool, quiet: bool):
    from ray import tune

    trainable = tune.with_parameters(
        run_trial, cfg_dict=cfg.to_dict(), prepared=prepared, plan=plan,
        train_storage=str(storage / name / TRAIN_RUNS))
    # The driver function only builds and watches a TorchTrainer: it holds no CPU (a bundle
    # must hold something, so a little memory), leaving whole CPUs to the worker and Ray Data.
    trainable = tune.with_resources(trainable, tune.PlacementGroupFactory([{"CPU": 0, "memory": DRIVER_MEMORY}]))
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"  # the classic table shows our columns
    if resume:
        # The restored run keeps its original progress settings (Tune stores them).
        tuner = tune.Tuner.restore(str(storage / name), trainable=trainable,
                                   resume_unfinished=True, resume_errored=True, restart_errored=False)
        return tuner.fit()
    reporter = tune.CLIReporter(parameter_columns=["fraction", "seed"], metric_columns=PROGRESS_METRICS,
                                max_report_frequency=30, sort_by_metric=False)
    tuner = tune.Tuner(
        trainable,
        param_space={"fraction": tune.grid_search(list(cfg.sweep.fractions)),
                     "seed": tune.grid_search(list(cfg.sweep.seeds))},
        tune_config=tune.TuneConfig(max_concurrent_trials=plan.max_concurrent_trials, reuse_actors=False),
        run_config=tune.RunConfig(
            name=name, storage_path=str(storage),
            failure_config=tune.FailureConfig(max_failures=cfg.sweep.max_failures),
            progress_reporter=None if quiet else reporter,
            verbose=0 if quiet else 1,
        ),
    )
    return tuner.fit()


if __name__ == "__main__":
    sys.exit(main())
