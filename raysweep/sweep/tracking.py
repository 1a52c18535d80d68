"""MLflow tracking, an optional extra (`pip install 'raysweep[mlflow]'`): one MLflow run per
trial, logged by Ray Tune's own MLflow callback, and the analysis's files as a parent run.

MLflow is imported only inside these functions. The store is any MLflow tracking URI; a
`file:` store (or a plain path) works with mlflow-skinny, which this project pins: MLflow 3
keeps that backend in maintenance mode behind MLFLOW_ALLOW_FILE_STORE, set here for it.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from raysweep.errors import RaysweepError

INSTALL = "pip install 'raysweep[mlflow]'"
# Tune's own bookkeeping in every result: not metrics of the model.
TUNE_KEYS = {"training_iteration", "iterations_since_restore", "time_this_iter_s", "time_since_restore",
             "timesteps_total", "episodes_total", "timesteps_since_restore", "timestamp", "pid", "done",
             "should_checkpoint", "trial_id", "date", "hostname", "node_ip", "experiment_tag", "checkpoint_dir_name"}
PARENT_TAG = "mlflow.parentRunId"


def check_mlflow() -> None:
    """Raise a one-line RaysweepError if MLflow is not installed (no import: fast)."""
    if importlib.util.find_spec("mlflow") is None:
        raise RaysweepError(f"--mlflow needs MLflow, which is not installed: {INSTALL}")


def _prepare(uri: str) -> str:
    """The URI as MLflow takes it, with the file store allowed when that is what it names."""
    check_mlflow()
    if "://" not in uri and not uri.startswith("file:"):
        if ":" in uri.split("/")[0]:
            raise RaysweepError(f"--mlflow {uri}: not a tracking URI MLflow knows (file:/path, sqlite:///db, "
                                "http://host:port, or a local path)")
        uri = Path(uri).expanduser().resolve().as_uri()
    if uri.startswith("file:"):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    if uri.startswith("sqlite:") and importlib.util.find_spec("sqlalchemy") is None:
        raise RaysweepError(f"--mlflow {uri}: a sqlite store needs the full MLflow (pip install mlflow); "
                            "mlflow-skinny, which raysweep[mlflow] installs, writes file: stores")
    return uri


def client(uri: str):
    """MLflow's own client for the store at `uri` (what tests and users read runs back with)."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=_prepare(uri))


def flat_params(cfg_dict: dict, prefix: str = "") -> dict[str, str]:
    """The config as MLflow params: dotted keys (train.lr), values as text."""
    out = {}
    for key, value in cfg_dict.items():
        if isinstance(value, dict):
            out.update(flat_params(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = str(value)
    return out


def tune_callback(uri: str, experiment_name: str, cfg_dict: dict):
    """A Ray Tune callback that logs each trial as one MLflow run in experiment `experiment_name`
    (name it after the sweep: its directory name): params fraction, seed, n_train and the
    flattened config; every epoch's metrics at step = epoch; the final test metrics with the
    last epoch. A resumed sweep continues each trial's run instead of starting another."""
    cls = __getattr__("MLflowTrialCallback")  # a module __getattr__ serves only attribute access
    return cls(_prepare(uri), experiment_name, flat_params(cfg_dict))


def _callback_class():
    """Ray Tune's MLflowLoggerCallback, subclassed for raysweep's params, steps and resume. Built
    on first use (module __getattr__), so importing this module imports neither ray nor mlflow,
    and pickle still finds the class by name when Tune saves and restores the sweep."""
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    class MLflowTrialCallback(MLflowLoggerCallback):
        def __init__(self, uri: str, experiment_name: str, params: dict[str, str]):
            super().__init__(tracking_uri=uri, experiment_name=experiment_name,
                             tags={"raysweep.sweep": experiment_name})
            self.params = params

        def setup(self, *args, **kwargs):
            _prepare(self.tracking_uri)  # a restored sweep runs in a new process
            super().setup(*args, **kwargs)
            self._n_train_logged: set[str] = set()

        def log_trial_start(self, trial):
            if trial in self._trial_runs:
                return
            mlflow_client = self.mlflow_util._get_client()
            found = mlflow_client.search_runs([self.mlflow_util.experiment_id],
                                              f"tags.`raysweep.trial_id` = '{trial.trial_id}'")
            if found:  # a resumed sweep: the trial keeps its run
                self._trial_runs[trial] = found[0].info.run_id
                self._n_train_logged.add(trial.trial_id)
                mlflow_client.update_run(found[0].info.run_id, status="RUNNING")
                return
            tags = {**self.tags, "trial_name": str(trial), "raysweep.trial_id": trial.trial_id}
            run = self.mlflow_util.start_run(tags=tags, run_name=str(trial))
            self._trial_runs[trial] = run.info.run_id
            params = {**self.params, "fraction": trial.config.get("fraction"), "seed": trial.config.get("seed")}
            self.mlflow_util.log_params(run_id=run.info.run_id, params_to_log=params)

        def log_trial_result(self, iteration, trial, result):
            run_id = self._trial_runs[trial]
            if trial.trial_id not in self._n_train_logged and result.get("n_train") is not None:
                self._n_train_logged.add(trial.trial_id)
                self.mlflow_util.log_params(run_id=run_id, params_to_log={"n_train": result["n_train"]})
            metrics = {k: v for k, v in result.items() if k not in TUNE_KEYS and isinstance(v, (int, float))}
            self.mlflow_util.log_metrics(run_id=run_id, metrics_to_log=metrics,
                                         step=int(result.get("epoch") or iteration))

    MLflowTrialCallback.__module__ = __name__
    MLflowTrialCallback.__qualname__ = "MLflowTrialCallback"
    return MLflowTrialCallback


def __getattr__(name: str):
    if name == "MLflowTrialCallback":
        cls = _callback_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def log_analysis(uri: str, experiment_name: str, files: list[Path], result: dict) -> str:
    """Log the analysis's files (figures, fit.json, report.md) as artifacts of one parent run in
    the sweep's experiment, with the law's parameters as metrics; the sweep's trial runs become
    its children. Returns the parent run's id."""
    mlflow_client = client(uri)
    exp = mlflow_client.get_experiment_by_name(experiment_name)
    exp_id = exp.experiment_id if exp else mlflow_client.create_experiment(experiment_name)
    run = mlflow_client.create_run(exp_id, run_name=f"{experiment_name}: scaling analysis",
                                   tags={"raysweep.sweep": experiment_name, "raysweep.kind": "analysis"})
    run_id = run.info.run_id
    fit = result.get("_fit")
    if fit is not None:
        for name, value in fit.params.items():
            mlflow_client.log_metric(run_id, f"law_{name}", float(value))
        mlflow_client.log_param(run_id, "law", fit.formula())
    mlflow_client.log_param(run_id, "metric", result.get("metric"))
    mlflow_client.log_param(run_id, "model", result.get("model"))
    for path in files:
        mlflow_client.log_artifact(run_id, str(path))
    for child in mlflow_client.search_runs([exp_id], "tags.`raysweep.trial_id` != ''"):
        mlflow_client.set_tag(child.info.run_id, PARENT_TAG, run_id)
    mlflow_client.set_terminated(run_id)
    return run_id
