"""A Ray Tune experiment directory -> tidy pandas tables: one row per trial, one per trial and epoch.

Read through Ray Tune's own `ExperimentAnalysis`, which needs neither the trainable nor a
running cluster. Also the per-fraction summary (mean, std, 95% CI over seeds) that the
report and `summary.csv` show.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from raysweep.errors import RaysweepError

EPOCH_METRICS = ["lr", "train_loss", "train_top1_error", "train_top5_error", "val_loss",
                 "val_top1_error", "val_top5_error", "images_per_sec"]
# Where each epoch's time went, and the attempt's start-up (the same on every row of an attempt).
# Experiments made before these were reported lack them; every reader treats them as optional.
TIME_METRICS = ["steps", "time_train_s", "time_eval_s", "time_test_s", "time_checkpoint_s", "time_epoch_s",
                "checkpointed", "wall_time_s", "time_to_first_step_s", "time_startup_s", "time_data_load_s"]
FINAL_METRICS = ["test_loss", "test_top1_error", "test_top5_error", "best_val_top5_error"]
# The final report's description of the trial (optional too): what ran and how it ended.
FINAL_INFO = ["steps", "select_metric", "best_val_error", "stopped_early", "max_epochs", "num_classes",
              "num_params", "model", "wall_time_s", "train_loss_slope"]
VAL_METRICS = ["val_loss", "val_top1_error", "val_top5_error"]
ERROR_METRICS = ["val_top1_error", "val_top5_error", "test_top1_error", "test_top5_error"]
CONFIG_FILE = "raysweep_config.json"
MANIFEST_FILE = "manifest.json"


@dataclass
class Experiment:
    """One sweep's results. `trials`: a row per trial, errored and unfinished ones included,
    with `excluded` saying why a trial is left out of fits ("" if it is used).
    `epochs`: a row per trial and epoch. `config`: raysweep_config.json, if present."""

    path: Path
    trials: pd.DataFrame
    epochs: pd.DataFrame
    config: dict | None
    manifest: dict | None = None  # manifest.json (raysweep.sweep.manifest), absent in older experiments

    @property
    def name(self) -> str:
        return (self.config or {}).get("name") or self.path.name

    def trial_value(self, key: str):
        """The one value of a per-trial column every trial that reports it agrees on (e.g.
        num_classes, model), or None if none reports it. Disagreeing values: the most common."""
        if key not in self.trials:
            return None
        values = self.trials[key].dropna()
        return None if values.empty else values.mode().iloc[0]


def load_experiment(path: str | Path) -> Experiment:
    """Read an experiment directory (`<storage>/<name>` of a raysweep sweep) into tables."""
    from ray.tune import ExperimentAnalysis

    path = Path(path).expanduser().resolve()
    if not path.is_dir():
        raise RaysweepError(f"experiment directory {path} does not exist")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            analysis = ExperimentAnalysis(str(path))
    except ValueError as err:
        if "experiment snapshot" not in str(err):
            raise RaysweepError(f"cannot read Ray Tune experiment {path}: {err}") from err
        raise RaysweepError(
            f"{path} is not a Ray Tune experiment directory (no experiment_state-*.json); "
            "pass <storage-path>/<name>, as printed at the end of `python -m raysweep.tune`"
        ) from err
    except Exception as err:  # corrupt or foreign state file: name it, no traceback
        raise RaysweepError(f"cannot read Ray Tune experiment {path}: {type(err).__name__}: {err}") from err

    stored = _read_json(path / CONFIG_FILE)
    trial_rows, epoch_frames, unreadable = [], [], 0
    for trial in analysis.trials:
        config = trial.config or {}
        missing = [k for k in ("fraction", "seed") if k not in config]
        if missing:
            raise RaysweepError(
                f"trial {trial.trial_id} in {path} has no {', '.join(missing)} in its config: "
                "not a raysweep sweep (its param space is fraction x seed)"
            )
        width = trial_width(config, stored)
        epochs = _epoch_table(analysis.trial_dataframes.get(trial.trial_id), trial, config, width)
        if epochs.empty and trial.last_result:
            unreadable += 1
        epoch_frames.append(epochs)
        trial_rows.append(_trial_row(trial, config, epochs, width))
    if unreadable:
        # Tune could not read those trials' result.json/progress.csv; the final result from
        # the experiment state still gives their trial rows, but they have no curves.
        warnings.warn(f"{unreadable} trial(s) in {path} have no readable per-epoch results; "
                      "their curves are missing")

    trials = pd.DataFrame(trial_rows)
    if trials.empty:
        raise RaysweepError(f"experiment {path} holds no trials")
    trials = trials.sort_values(["fraction", "width", "seed"], ignore_index=True)
    trials["best_epoch"] = trials["best_epoch"].astype("Int64")
    trials["learned"] = trials["learned"].astype("boolean")
    trials["excluded"] = [_exclusion(row) for row in trials.itertuples()]
    frames = [f for f in epoch_frames if not f.empty]
    epochs = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(
        columns=["trial_id", "fraction", "width", "seed", "n_train", "epoch", *EPOCH_METRICS, "time_total_s"])
    epochs = epochs.sort_values(["fraction", "width", "seed", "epoch"], ignore_index=True)

    return Experiment(path=path, trials=trials, epochs=epochs, config=stored,
                      manifest=_read_json(path / MANIFEST_FILE))


def trial_width(params: dict, stored: dict | None) -> float:
    """The `model.width` a trial trained: its Tune param "width" on a grid over widths; a sweep over
    one width has none, so the stored config's model.width (1.0, torchvision's AlexNet, if unset)."""
    if "width" in params:
        return float(params["width"])
    return float(((stored or {}).get("model") or {}).get("width", 1.0))


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text()) if path.exists() else None
    except (OSError, json.JSONDecodeError) as err:
        raise RaysweepError(f"cannot read {path}: {err}") from err


def _epoch_table(df: pd.DataFrame | None, trial, config: dict, width: float) -> pd.DataFrame:
    if df is None or df.empty or "epoch" not in df:
        return pd.DataFrame()
    cols = [c for c in ["epoch", *EPOCH_METRICS, *TIME_METRICS, "n_train", "time_total_s"] if c in df]
    out = df[cols].copy()
    # A trial restarted by Tune may report an epoch twice; the last report is the one that counts.
    out = out.drop_duplicates("epoch", keep="last")
    out.insert(0, "trial_id", trial.trial_id)
    out.insert(1, "fraction", float(config["fraction"]))
    out.insert(2, "width", width)
    out.insert(3, "seed", int(config["seed"]))
    out["epoch"] = out["epoch"].astype(int)
    return out.reset_index(drop=True)


def _trial_row(trial, config: dict, epochs: pd.DataFrame, width: float) -> dict:
    last = dict(trial.last_result or {})
    row = {"trial_id": trial.trial_id, "fraction": float(config["fraction"]), "width": width,
           "seed": int(config["seed"]),
           "status": str(trial.status), "n_train": last.get("n_train"),
           "epochs": int(epochs["epoch"].max()) if not epochs.empty else last.get("epoch"),
           "best_epoch": last.get("best_epoch"), "learned": last.get("learned")}
    # The test metrics come from the best-validation checkpoint, so the val metrics shown
    # beside them are those of best_epoch; without one (unfinished trial), the last epoch's.
    val_src = last
    if row["best_epoch"] is not None and not epochs.empty:
        at_best = epochs[epochs["epoch"] == int(row["best_epoch"])]
        if not at_best.empty:
            val_src = at_best.iloc[-1].to_dict()
    row.update({k: val_src.get(k) for k in VAL_METRICS})
    row.update({k: last.get(k) for k in FINAL_METRICS})
    row.update({k: last.get(k) for k in FINAL_INFO if k in last})
    row["time_total_s"] = last.get("time_total_s")
    row["error"] = _error_line(trial) if row["status"] == "ERROR" else ""
    row["path"] = str(trial.path)
    return row


def _error_line(trial) -> str:
    try:
        text = trial.get_error() or ""
    except Exception:  # the error file itself may be gone; the status still says ERROR
        return "errored (no error file)"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else "errored"


def _exclusion(row) -> str:
    if row.status == "ERROR":
        return "errored"
    if row.status != "TERMINATED":
        return f"unfinished ({row.status})"
    if pd.isna(row.test_top5_error):
        return "no test metrics"
    if not pd.isna(row.learned) and not bool(row.learned):
        return "did not learn"
    return ""


def trials_for_fit(trials: pd.DataFrame, include_unlearned: bool = False) -> pd.DataFrame:
    """The trials a fit may use: finished, with test metrics, and (unless asked) learned.

    Warns once, saying how many trials are left out and why.
    """
    reasons = trials["excluded"].copy()
    if include_unlearned:
        reasons = reasons.where(reasons != "did not learn", "")
    left_out = reasons[reasons != ""]
    if not left_out.empty:
        counts = ", ".join(f"{n} {why}" for why, n in left_out.value_counts().sort_index().items())
        hint = " (--include-unlearned keeps those that did not learn)" if "did not learn" in set(left_out) else ""
        warnings.warn(f"{left_out.size} of {len(trials)} trials left out of the fit: {counts}{hint}")
    return trials[reasons == ""].reset_index(drop=True)


def per_fraction_summary(used: pd.DataFrame, all_trials: pd.DataFrame | None = None,
                         metrics=ERROR_METRICS, level: float = 0.95) -> pd.DataFrame:
    """One row per fraction: n_train, seeds used, and mean, std and CI of each metric over them.

    The CI is Student's t over seeds (mean ± t·std/√k), clipped to [0, 1]; NaN with one seed. Given
    `all_trials`, every fraction of the sweep gets a row (NaN where no trial is usable)
    and `n_left_out` counts the trials of that fraction not in `used`.
    """
    from scipy import stats

    everything = used if all_trials is None else all_trials
    rows = []
    for fraction, every in everything.groupby("fraction", sort=True):
        group = used[used["fraction"] == fraction]
        sizes = (group if len(group) else every)["n_train"].astype(float).dropna()
        row = {"fraction": fraction, "n_train": int(round(sizes.mean())) if sizes.size else None,
               "n_seeds": len(group)}
        if all_trials is not None:
            row["n_left_out"] = len(every) - len(group)
        for m in metrics:
            values = group[m].astype(float).dropna().to_numpy()
            mean = float(values.mean()) if values.size else np.nan
            std = float(values.std(ddof=1)) if values.size > 1 else np.nan
            half = float(stats.t.ppf((1 + level) / 2, values.size - 1) * std / np.sqrt(values.size)) \
                if values.size > 1 else np.nan
            # Errors are fractions: a t-interval from two or three seeds can poke past 0 or 1.
            row.update({f"{m}_mean": mean, f"{m}_std": std, f"{m}_ci_low": max(mean - half, 0.0),
                        f"{m}_ci_high": min(mean + half, 1.0)})
        rows.append(row)
    return pd.DataFrame(rows)


def resolve_metric(exp: Experiment, setting: str = "auto") -> tuple[str, str]:
    """The error to fit and the sentence that says why. "auto": the test error at
    k = raysweep.trial.metrics.primary_k(num_classes) (top-5 with >= 50 classes, else top-1), with
    num_classes from the trials' final reports; an experiment made before they reported it
    keeps the old default, test_top5_error."""
    if setting != "auto":
        return setting, f"`{setting}`, chosen with --metric"
    classes = exp.trial_value("num_classes")
    if classes is None:
        return "test_top5_error", ("`test_top5_error`: the trials do not report their number of classes "
                                   "(an experiment made before they did), so the old default")
    from raysweep.trial.metrics import TOP5_MIN_CLASSES, primary_k

    k = primary_k(int(classes))
    return f"test_top{k}_error", (f"`test_top{k}_error`: the rule is top-5 error with {TOP5_MIN_CLASSES} or more "
                                  f"classes, else top-1 (top-5 of a few classes is near 0 and says little); "
                                  f"this dataset has {int(classes)} classes")
