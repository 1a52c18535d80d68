"""The sweep: `python -m raysweep.tune`, a Ray Tune grid over training fraction x width x seed.

Each trial is a function that builds and fits a Ray Train `TorchTrainer` (the Train V2
pattern); metrics reach Tune from Train's controller through a file (`trainer.ForwardReports`). Results, checkpoints and
TensorBoard files live under <storage-path>/<name>; `--resume` continues a stopped sweep.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import signal
import sys
import time
from pathlib import Path

from raysweep.cluster.resources import plan_resources
from raysweep.cluster.connect import start_or_join
from raysweep.console import python_command
from raysweep.config import Config, add_config_args, config_from_args, flag_assignments
from raysweep.errors import RaysweepError, cli_entry
from raysweep.sweep import ray_compat
from raysweep.sweep.resume import check_resume
from raysweep.io import atomic_write_json
from raysweep.sweep.summary import complete_grid, finished_points, format_table, summarize, write_summary

CONFIG_FILE = "raysweep_config.json"
TRAIN_RUNS = "train_runs"
DRIVER_MEMORY = 256 * 1024**2


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


def _examples() -> str:
    """The --help examples, with the interpreter that runs this (so they run as pasted)."""
    rows = [(python_command("-m", "raysweep.tune", *cmd.split()), what) for cmd, what in (
        ("--num-gpus 4", "full recipe, mini-ImageNet"), ("--data /data/mini-imagenet", "a local hub snapshot"),
        ("--config configs/demo.yaml", "the CPU demo, real photos"),
        ("--name my-sweep --resume", "continue a stopped sweep"))]
    width = max(len(cmd) for cmd, _ in rows)
    return "examples:\n" + "".join(f"  {cmd:<{width}}   # {what}\n" for cmd, what in rows)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m raysweep.tune",
        description="Run a Ray Tune grid search over training fraction x seed (x model width, with --widths). Each trial trains "
                    "a model from scratch (AlexNet by default) in a Ray Train TorchTrainer on a stratified "
                    "subset, reports train/val loss and top-1/top-5 error every epoch, and ends with the "
                    "test error of its best-validation checkpoint.",
        epilog=_examples(),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p)
    p.add_argument("--data", metavar="SOURCE",
                   help="HF dataset id, a local parquet directory, 'builtin:cifar10-sample' or 'synthetic' "
                        "(default: data.source of the config, timm/mini-imagenet)")
    p.add_argument("--num-gpus", type=int, metavar="N",
                   help="GPUs for the local Ray instance (default: all this machine has); checked against reality")
    p.add_argument("--gpus-per-trial", metavar="G",
                   help="'auto' (default): small fractions share a GPU, large ones get a whole one, by memory; "
                        "or a number: 1, 2, ... = one worker per GPU, 0.5 = two trials per GPU")
    p.add_argument("--fractions", type=float, nargs="+", metavar="F",
                   help="training fractions in (0, 1] (default: sweep.fractions of the config)")
    p.add_argument("--widths", type=float, nargs="+", metavar="W",
                   help="model widths (AlexNet's channel multiplier): the grid becomes fraction x width x seed "
                        "(default: sweep.widths of the config, else model.width alone)")
    p.add_argument("--seeds", type=int, nargs="+", metavar="S",
                   help="seeds: subset, init, augmentation (default: sweep.seeds of the config)")
    p.add_argument("--epochs", type=int, metavar="N", help="epochs per trial; a cap when train.patience > 0 "
                                                           "(default: train.epochs of the config)")
    p.add_argument("--storage-path", metavar="DIR", help="where experiments go (default: sweep.storage_path, ./results)")
    p.add_argument("--name", help="experiment name (default: config name + timestamp)")
    p.add_argument("--resume", action="store_true",
                   help="continue the experiment --name (or the newest of this config): errored and "
                        "unfinished trials resume from their checkpoints, finished ones are kept")
    p.add_argument("--address", metavar="ADDR", help="join an existing cluster ('auto' or host:port) "
                                                     "(default: start a local one)")
    p.add_argument("--dashboard-host", default="127.0.0.1",
                   help="interface for the local dashboard (default: 127.0.0.1; 0.0.0.0 exposes it)")
    p.add_argument("--no-dashboard", dest="dashboard", action="store_false",
                   help="start the local Ray without its dashboard (it takes ~6%% of a 2-core machine; "
                        "make demo-width leaves it out); a cluster joined with --address keeps its own")
    p.add_argument("--mlflow", metavar="URI",
                   help="also log every trial as an MLflow run to this tracking URI (e.g. sqlite:///mlflow.db, "
                        "http://host:5000 or file:./mlruns); needs the MLflow extra (pip install -c constraints.txt -e '.[mlflow]' in the clone)")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--verbose", action="store_true", help="show Ray's own logs too (INFO lines, worker output)")
    out.add_argument("--quiet", action="store_true", help="only errors and the final lines (for scripts)")
    return p


def _n_train_plan(cfg: Config, prepared, params: dict[float, int]) -> dict[tuple[float, float, int], dict]:
    """(fraction, width, seed) -> training images, epoch cap and parameters, as the trials will
    compute them. The subset depends on (fraction, seed) only: every width sees the same images."""
    from raysweep.data import stratified_subset
    from raysweep.trial.runner import epochs_for_budget

    labels = prepared.labels("train")
    plan = {}
    for f in cfg.sweep.fractions:
        for s in cfg.sweep.seeds:
            n = len(stratified_subset(labels, f, s))
            for w in cfg.widths:
                plan[(float(f), w, int(s))] = {"n_train": n, "num_params": params[w],
                                               "max_epochs": epochs_for_budget(cfg.train, n, len(labels))}
    return plan


def stop_on_sigterm(resume: str) -> None:
    """Make SIGTERM (`kill`, `docker stop`, a batch scheduler's time limit) stop the sweep as
    Ctrl-C does: Tune ends the running trials, saves the experiment, and the sweep prints its
    `--resume` line. A second SIGTERM stops at once. Where the signal also ended the Ray this
    driver started (sent to the process group), nothing can be ended cleanly any more: the driver
    prints the resume line and exits at once (the experiment as saved at most 2 s before, and
    each trial's last checkpoint, are on disk). Call after `ray.init`, whose own handler dumps
    a C++ stack trace and aborts the driver without a last save, or waits a minute for a GCS
    that is gone."""
    import threading

    def on_sigterm(signum, frame):
        if ray_compat.local_ray_exited():
            print(f"\nraysweep: SIGTERM reached Ray's processes too; stopping now. Continue the sweep with:\n"
                  f"  {resume}", file=sys.stderr, flush=True)
            os._exit(128 + signal.SIGTERM)
        print("\nraysweep: SIGTERM: stopping the sweep after saving its state (again to stop now)",
              file=sys.stderr, flush=True)
        signal.raise_signal(signal.SIGINT)  # Tune's handler the first time, KeyboardInterrupt after

    if threading.current_thread() is threading.main_thread():  # Python installs handlers only there
        signal.signal(signal.SIGTERM, on_sigterm)


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    gpt = args.gpus_per_trial
    if gpt is not None and gpt != "auto":
        try:
            gpt = float(gpt)
        except ValueError:
            raise RaysweepError(f"--gpus-per-trial must be 'auto' or a number, got {gpt!r}") from None
    flags = {"data.source": args.data, "sweep.fractions": args.fractions, "sweep.seeds": args.seeds,
             "sweep.widths": args.widths, "train.epochs": args.epochs, "sweep.gpus_per_trial": gpt}
    cfg = config_from_args(args, flags)
    if args.num_gpus is not None and args.num_gpus < 0:
        raise RaysweepError(f"--num-gpus must be >= 0, got {args.num_gpus}")
    if args.address and not args.dashboard:
        raise RaysweepError("--no-dashboard applies to the Ray this sweep starts; the cluster at "
                            f"--address {args.address} keeps its own dashboard")
    storage, name = _experiment_dir(cfg, args)
    exp_dir = storage / name
    if args.resume:
        if not (exp_dir / CONFIG_FILE).is_file():
            raise RaysweepError(f"--resume: {exp_dir} is not a raysweep experiment (no {CONFIG_FILE})")
        # A resumed sweep is the sweep that was started: options that would change it are refused.
        stored = json.loads((exp_dir / CONFIG_FILE).read_text())
        check_resume(exp_dir, stored, args.config, _asked(args, flags))
        cfg = Config.from_dict(stored)
    elif exp_dir.exists() and any(exp_dir.iterdir()):
        raise RaysweepError(f"experiment {exp_dir} already exists: pass --resume to continue it, "
                            "or choose another --name")
    # Every refusal a user can cause comes here, before Ray starts.
    _check_source(cfg)
    if args.mlflow:
        from raysweep.sweep.tracking import tracking_uri

        tracking_uri(args.mlflow)  # installed, and a URI MLflow knows
    local_plan = None
    if not args.address:
        from raysweep.cluster.resources import plan_local

        local_plan = plan_local(num_gpus=args.num_gpus, gpus_per_trial=cfg.sweep.gpus_per_trial,
                                cpus_per_trial=cfg.sweep.cpus_per_trial,
                                gpus_per_trial_explicit=args.gpus_per_trial is not None)
    from raysweep.trial.model import model_info

    for w in cfg.widths:
        model_info(cfg.model.name, w, 2, cfg.data.image_size, cfg.train.dropout)

    quiet, verbose = args.quiet, args.verbose
    if verbose:
        ray_compat.plain_ray_output()
    else:
        ray_compat.quiet_ray_logs()
    ray_compat.apply_env_defaults("driver", console=not verbose, local=not args.address)
    t0 = time.time()
    info = start_or_join(address=args.address, num_gpus=local_plan.gpus if local_plan else args.num_gpus,
                         dashboard_host=args.dashboard_host, dashboard=args.dashboard, quiet=not verbose)
    # What continues this sweep as pasted: the same experiment, cluster and MLflow store.
    resume = python_command("-m", "raysweep.tune", "--resume", "--name", name, "--storage-path", storage,
                            *(["--address", args.address] if args.address else []),
                            *(["--mlflow", args.mlflow] if args.mlflow else []))
    stop_on_sigterm(resume)
    ray_compat.check_version()
    plan = plan_resources(cluster_cpus=info["cpus"], cluster_gpus=info["gpus"],
                          gpus_per_trial=cfg.sweep.gpus_per_trial, cpus_per_trial=cfg.sweep.cpus_per_trial,
                          gpus_per_trial_explicit=args.gpus_per_trial is not None,
                          host_cpus=os.cpu_count() if info["local"] else info["max_node_cpus"],
                          max_trials=cfg.sweep.max_concurrent_trials, cpu_workers=cfg.sweep.cpu_workers_per_trial)
    if not plan.use_gpu and cfg.train.num_threads == 0:
        cfg.train.num_threads = plan.torch_threads
    if not quiet:
        _print_banner(info, plan, cfg, exp_dir)
    gpu_setup: dict = {}
    if plan.use_gpu:  # one second on every GPU node, before any trial: one line if CUDA cannot run
        from raysweep.cluster.preflight import cuda_preflight

        report = cuda_preflight(bf16=cfg.train.bf16)
        gpu_setup["precision"] = report.precision
        for note in report.notes:
            print(note)
    from raysweep.data import prepare_from_config

    prepared = prepare_from_config(cfg.data, progress=not quiet)
    models = {w: model_info(cfg.model.name, w, prepared.num_classes, prepared.image_size, cfg.train.dropout)
              for w in cfg.widths}
    model = models[cfg.widths[0]]
    if len(models) > 1:
        model = {**model, "width": None, "model": f"{cfg.model.name} x {len(models)} widths",
                 "widths": {str(w): m["num_params"] for w, m in models.items()}}
    if plan.use_gpu or not info["local"]:  # trials read the cache on the nodes that train
        from raysweep.cluster.preflight import check_cache_on_nodes

        check_cache_on_nodes(prepared.path, use_gpu=plan.use_gpu)
    if plan.use_gpu:
        plan, gpu_setup["reserve_bytes"] = _gpu_shares(cfg, prepared, plan, info, report)
        if plan.auto and not quiet:
            print(f"GPU shares: {plan.describe()}")
    grid = _n_train_plan(cfg, prepared, {w: m["num_params"] for w, m in models.items()})
    exp_dir.mkdir(parents=True, exist_ok=True)
    if not args.resume:
        atomic_write_json(exp_dir / CONFIG_FILE, cfg.to_dict())
    from raysweep.sweep import manifest

    manifest.start(exp_dir, argv=list(sys.argv[1:] if argv is None else argv), cfg_dict=cfg.to_dict(),
                   data_info=_data_info(prepared), model_info=model,
                   resources={"cpus": info["cpus"], "gpus": info["gpus"], "plan": plan.describe(),
                              "address": args.address or "local"})
    if not quiet:
        params = ", ".join(f"width {w:g}: {m['num_params']:,}" for w, m in models.items())
        print(f"Model: {model['model']}, " + (f"{model['num_params']:,} parameters" if len(models) == 1 else
                                               f"parameters by {params}") + f", {prepared.image_size} px input, "
              f"{prepared.num_classes} classes; data: " +
              ", ".join(f"{s} {n:,}" for s, n in prepared.counts.items()), flush=True)

    from raysweep.trial.metrics import select_metric
    from raysweep.sweep.display import SweepDisplay

    done = finished_points(exp_dir, cfg.model.width) if args.resume else set()
    display = SweepDisplay(grid, select_metric(cfg.train.select_metric, prepared.num_classes), quiet=quiet,
                           done=done, concurrency=plan.max_concurrent_trials, default_width=cfg.model.width,
                           train_runs=exp_dir / TRAIN_RUNS)
    callbacks = [display]
    if args.mlflow:
        from raysweep.sweep.tracking import notes, tune_callback

        callbacks.append(tune_callback(args.mlflow, name, cfg.to_dict()))
        for line in [] if quiet else notes(args.mlflow, f"each trial logged as a run of experiment {name!r}"):
            print(line, flush=True)
    try:
        results = _fit(cfg, prepared, plan, storage, name, resume=args.resume, callbacks=callbacks,
                       verbose=verbose, gpu_setup=gpu_setup)
    except BaseException as err:
        manifest.finish(exp_dir, status=f"failed: {type(err).__name__}", trials={})
        raise
    display.bar.close()
    rows = complete_grid(summarize(results, cfg.model.width), cfg.sweep.fractions, cfg.sweep.seeds, cfg.widths)
    for r in rows:  # NOT_STARTED rows too: the parameters follow from the width
        if r.get("num_params") is None:
            r["num_params"] = grid.get((r["fraction"], r["width"], r["seed"]), {}).get("num_params")
    write_summary(exp_dir, rows)
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    wall = time.time() - t0
    bad = [r for r in rows if r["status"] != "TERMINATED"]
    stopped = [r for r in rows if r["status"] in ("UNFINISHED", "NOT_STARTED")]
    unlearned = [r for r in rows if r["status"] == "TERMINATED" and r.get("learned") is False]
    manifest.finish(exp_dir, trials=counts, status="interrupted" if stopped else "failed" if bad else "finished")
    if stopped:  # interrupted: the resume line, and nothing that suggests the sweep is done
        print(f"\nInterrupted after {wall:.0f} s: {len(rows) - len(stopped)} of {len(rows)} trials ended. "
              f"Continue the sweep with:\n  {resume}")
        return 1
    print()
    print(format_table(rows, display.metric))
    if bad:
        print(f"\n{len(bad)} of {len(rows)} trial(s) failed (see `error` in {exp_dir / 'summary.csv'}). "
              f"Retry them with:\n  {resume}")
    if unlearned:
        print(f"{len(unlearned)} trial(s) stayed near chance (learned=False); the analysis leaves them "
              "out of the fit unless --include-unlearned.")
    print(f"\nSweep wall time: {wall:.1f} s")
    print(f"Experiment directory: {exp_dir}")
    print(f"Next: {python_command('-m', 'analysis.plot_scaling', exp_dir)}")
    return 1 if bad else 0


def _gpu_shares(cfg: Config, prepared, plan, info: dict, report):
    """The model's device reserve (measured on the CPU, about a second) and, under
    --gpus-per-trial auto, each fraction's GPU share from its data size and the GPU's memory."""
    from raysweep.cluster.gpu import measure_footprint, need_by_fraction, training_reserve_bytes
    from raysweep.trial.model import build_model

    size, tc = prepared.image_size, cfg.train
    footprint = measure_footprint(build_model(prepared.num_classes, tc.dropout, cfg.model.name, cfg.model.width),
                                  size, report.precision)
    reserve = training_reserve_bytes(footprint, batch_size=tc.batch_size, eval_batch_size=tc.eval_batch_size,
                                     image_size=size, precision=report.precision, optimizer=tc.optimizer,
                                     momentum=tc.momentum)
    if plan.auto:
        need = need_by_fraction(prepared.labels("train"), len(prepared.labels("validation")),
                                len(prepared.labels("test")), cfg.sweep.fractions, size, reserve)
        plan = plan_resources(cluster_cpus=info["cpus"], cluster_gpus=info["gpus"], gpus_per_trial="auto",
                              cpus_per_trial=cfg.sweep.cpus_per_trial, host_cpus=info["max_node_cpus"],
                              gpu_memory_bytes=report.gpu_memory_bytes, trial_bytes=need,
                              max_trials=cfg.sweep.max_concurrent_trials)
    return plan, reserve


def _asked(args, flags: dict) -> list[tuple[str, str]]:
    """Each config change the command line asks for, with how it was written (for --resume)."""
    names = {"data.source": "--data", "sweep.fractions": "--fractions", "sweep.seeds": "--seeds",
             "sweep.widths": "--widths", "train.epochs": "--epochs", "sweep.gpus_per_trial": "--gpus-per-trial"}
    given = {k: v for k, v in flags.items() if v is not None}
    shown = [f"{names[k]} {' '.join(map(str, v)) if isinstance(v, list) else v}" for k, v in given.items()]
    return [(o, f"--set {o}") for o in args.overrides] + list(zip(flag_assignments(given), shown))


def _data_info(prepared) -> dict:
    """What manifest.json records of the data: where it came from, which cache, how many rows."""
    meta = prepared.meta
    return {"source": meta.get("source"), "fingerprint": meta.get("fingerprint"),
            "cache_key": prepared.path.name, "cache_path": str(prepared.path), "counts": prepared.counts,
            "num_classes": prepared.num_classes,
            # How validation was carved, without the list of rows (in the cache's meta.json).
            "carved_validation": {k: v for k, v in (meta.get("carved") or {}).items() if k != "rows"} or None}


def _check_source(cfg: Config) -> None:
    """Refuse a bad local or built-in source (path, layout, columns) before anything starts."""
    from raysweep.data import check_local_source

    check_local_source(cfg.data)


def _print_banner(info: dict, plan, cfg: Config, exp_dir: Path) -> None:
    if info["local"] and info["dashboard_url"]:
        print(f"Ray dashboard: {info['dashboard_url']}  (token auth: the token is printed by "
              "`ray get-auth-token`; the browser asks for it once)")
    elif info["dashboard_url"]:
        print(f"Joined the Ray cluster; its dashboard: {info['dashboard_url']}")
    elif info["local"]:
        print("Ray dashboard: off (--no-dashboard); the progress below is the sweep's own")
    grid = len(cfg.sweep.fractions) * len(cfg.widths) * len(cfg.sweep.seeds)
    stop = f", early stopping after {cfg.train.patience} epochs without a new best" if cfg.train.patience else ""
    widths = f" x {len(cfg.widths)} widths" if len(cfg.widths) > 1 else ""
    print(f"Sweep {exp_dir.name}: {len(cfg.sweep.fractions)} fractions{widths} x {len(cfg.sweep.seeds)} seeds = "
          f"{grid} trials, up to {cfg.train.epochs} epochs ({cfg.train.budget} budget{stop}) on {cfg.data.source}")
    print(f"Resources: {info['cpus']:g} CPUs, {info['gpus']:g} GPUs; {plan.describe()}")
    sys.stdout.flush()


def _fit(cfg: Config, prepared, plan, storage: Path, name: str, *, resume: bool, callbacks: list, verbose: bool,
         gpu_setup: dict):
    import logging

    from ray import tune

    from raysweep.sweep.trainer import run_trial
    from raysweep.sweep.trial_logs import trial_loggers

    train_storage = str(storage / name / TRAIN_RUNS)
    trainable = tune.with_parameters(
        run_trial, cfg_dict=cfg.to_dict(), prepared=prepared, plan=plan,
        train_storage=train_storage, gpu_setup=gpu_setup)
    # The driver function only builds and watches a TorchTrainer: it holds no CPU (a bundle
    # must hold something, so a little memory), leaving whole CPUs to the worker and Ray Data.
    trainable = tune.with_resources(trainable, tune.PlacementGroupFactory([{"CPU": 0, "memory": DRIVER_MEMORY}]))
    # Every epoch once in each trial's result.json / progress.csv / TensorBoard files (stock: Tune's own).
    callbacks = [*([] if ray_compat.stock() else trial_loggers()), *callbacks]
    if not verbose:
        # Tune's interrupt message points at Tuner.restore; the sweep prints its own --resume line.
        logging.getLogger("ray.tune.tune").setLevel(logging.CRITICAL)
    if resume:
        tuner = tune.Tuner.restore(str(storage / name), trainable=trainable,
                                   resume_unfinished=True, resume_errored=True, restart_errored=False)
        ray_compat.replace_restored_callbacks(tuner, callbacks)
        return tuner.fit()
    tuner = tune.Tuner(
        trainable,
        param_space={"fraction": tune.grid_search(list(cfg.sweep.fractions)),
                     "width": tune.grid_search(cfg.widths),
                     "seed": tune.grid_search(list(cfg.sweep.seeds))},
        tune_config=tune.TuneConfig(max_concurrent_trials=plan.max_concurrent_trials,
                                    reuse_actors=True),
        run_config=tune.RunConfig(
            name=name, storage_path=str(storage),
            failure_config=tune.FailureConfig(max_failures=cfg.sweep.max_failures),
            callbacks=callbacks, progress_reporter=None, verbose=2 if verbose else 0,
        ),
    )
    return tuner.fit()


if __name__ == "__main__":
    sys.exit(main())
