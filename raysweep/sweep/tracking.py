"""MLflow tracking, an optional extra (pyproject.toml's `mlflow`): one MLflow run per trial, logged
from a Ray Tune callback through MLflow's public `MlflowClient`, and the analysis's files as a
parent run.

MLflow is imported only inside these functions. The store is any MLflow tracking URI. MLflow 3
wants a database (`sqlite:///mlflow.db`: SQLAlchemy and alembic) or a tracking server; a `file:`
store (or a plain path) still works, but MLflow 3 keeps that backend in maintenance mode behind
MLFLOW_ALLOW_FILE_STORE, which raysweep sets for its own writes and anything reading the store
must set too (`notes` says so on the console).
"""

from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path

from raysweep.console import python_command
from raysweep.errors import RaysweepError

# Run from the raysweep clone: the extra's pins live in its requirements file.
INSTALL = f"{python_command('-m', 'pip', 'install', '-c', 'constraints.txt', '-e', '.[mlflow]')} (in the raysweep clone)"
# Tune's own bookkeeping in every result: not metrics of the model.
TUNE_KEYS = {"training_iteration", "iterations_since_restore", "time_this_iter_s", "time_since_restore",
             "timesteps_total", "episodes_total", "timesteps_since_restore", "timestamp", "pid", "done",
             "should_checkpoint", "trial_id", "date", "hostname", "node_ip", "experiment_tag", "checkpoint_dir_name"}
PARENT_TAG = "mlflow.parentRunId"
BATCH = 100  # MlflowClient.log_batch takes at most 100 params (and 1000 metrics) per call


def check_mlflow(uri: str | None = None) -> None:
    """Raise a one-line RaysweepError if MLflow (or, for `sqlite:`, SQLAlchemy and alembic) is
    not installed (no import: fast)."""
    if importlib.util.find_spec("mlflow") is None:
        raise RaysweepError(f"--mlflow needs MLflow, which is not installed: {INSTALL}")
    if uri and uri.startswith("sqlite:"):
        missing = [m for m in ("sqlalchemy", "alembic") if importlib.util.find_spec(m) is None]
        if missing:
            raise RaysweepError(f"--mlflow {uri}: a sqlite store needs SQLAlchemy and alembic; {' and '.join(missing)} "
                                f"{'is' if len(missing) == 1 else 'are'} not installed: {INSTALL}")


def tracking_uri(uri: str) -> str:
    """The URI as MLflow takes it, with the file store allowed when that is what it names."""
    check_mlflow(uri)
    if "://" not in uri and not uri.startswith("file:"):
        if ":" in uri.split("/")[0]:
            raise RaysweepError(f"--mlflow {uri}: not a tracking URI MLflow knows (sqlite:///mlflow.db, "
                                "http://host:port, file:/path, or a local path)")
        uri = Path(uri).expanduser().resolve().as_uri()
    if uri.startswith("file:"):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return uri


def notes(uri: str, what: str) -> list[str]:
    """The console's lines on where `what` is logged, and what a file: store needs to be read."""
    uri = tracking_uri(uri)
    lines = [f"MLflow: {what} to {uri}"]
    if uri.startswith("file:"):
        lines.append("MLflow: note: MLflow 3 keeps file: stores in maintenance mode; raysweep sets "
                     "MLFLOW_ALLOW_FILE_STORE=true for its writes, and reading the store back (mlflow ui, "
                     "MlflowClient, mlflow.search_runs) needs it set too. MLflow 3's default is a database: "
                     "--mlflow sqlite:///mlflow.db")
    return lines


def client(uri: str):
    """MLflow's own client for the store at `uri` (what tests and users read runs back with)."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri(uri))


def experiment_id(mlflow_client, uri: str, name: str) -> str:
    """The id of experiment `name`, created if new. In a sqlite store its artifacts go beside the
    database (`mlartifacts/`): MLflow's default, ./mlruns in whatever the working directory is,
    scatters them over the places a sweep or an analysis happened to be started from."""
    exp = mlflow_client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if uri.startswith("sqlite:///"):  # sqlite:///rel/path.db or sqlite:////abs/path.db
        location = (Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts" / name).as_uri()
    return mlflow_client.create_experiment(name, artifact_location=location)


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
    return cls(tracking_uri(uri), experiment_name, flat_params(cfg_dict))


def _callback_class():
    """The Tune callback, on Tune's public LoggerCallback and MLflow's public MlflowClient. Built
    on first use (module __getattr__), so importing this module imports neither ray nor mlflow,
    and pickle still finds the class by name when Tune saves and restores the sweep."""
    from ray.tune.logger import LoggerCallback

    class MLflowTrialCallback(LoggerCallback):
        def __init__(self, uri: str, experiment_name: str, params: dict[str, str]):
            self.uri, self.experiment_name, self.params = uri, experiment_name, params
            self._client, self.experiment_id = None, None
            self._runs: dict[str, str] = {}  # trial id -> run id
            self._n_train_logged: set[str] = set()

        # Tune pickles its callbacks into the experiment: the client and the runs are rebuilt.
        def __getstate__(self) -> dict:
            return {"uri": self.uri, "experiment_name": self.experiment_name, "params": self.params}

        def __setstate__(self, state: dict) -> None:
            self.__init__(**state)

        def setup(self, *args, **kwargs):
            self._client = client(self.uri)  # a restored sweep runs in a new process
            self.experiment_id = experiment_id(self._client, self.uri, self.experiment_name)

        def _log_params(self, run_id: str, params: dict) -> None:
            from mlflow.entities import Param

            items = [Param(k, str(v)) for k, v in params.items()]
            for i in range(0, len(items), BATCH):
                self._client.log_batch(run_id, params=items[i:i + BATCH])

        def log_trial_start(self, trial):
            if trial.trial_id in self._runs:
                return
            found = self._client.search_runs([self.experiment_id], f"tags.`raysweep.trial_id` = '{trial.trial_id}'")
            if found:  # a resumed sweep: the trial keeps its run
                self._runs[trial.trial_id] = found[0].info.run_id
                self._n_train_logged.add(trial.trial_id)
                self._client.update_run(found[0].info.run_id, status="RUNNING")
                return
            tags = {"raysweep.sweep": self.experiment_name, "trial_name": str(trial), "raysweep.trial_id": trial.trial_id}
            run = self._client.create_run(self.experiment_id, run_name=str(trial), tags=tags)
            self._runs[trial.trial_id] = run.info.run_id
            self._log_params(run.info.run_id, {**self.params, "fraction": trial.config.get("fraction"),
                                               "seed": trial.config.get("seed")})

        def log_trial_result(self, iteration, trial, result):
            from mlflow.entities import Metric

            run_id = self._runs[trial.trial_id]
            if trial.trial_id not in self._n_train_logged and result.get("n_train") is not None:
                self._n_train_logged.add(trial.trial_id)
                self._log_params(run_id, {"n_train": result["n_train"]})
            now, step = int(time.time() * 1000), int(result.get("epoch") or iteration)
            metrics = [Metric(k, float(v), now, step) for k, v in result.items()
                       if k not in TUNE_KEYS and isinstance(v, (int, float))]
            self._client.log_batch(run_id, metrics=metrics)

        def log_trial_end(self, trial, failed: bool = False):
            run_id = self._runs.get(trial.trial_id)
            if run_id is not None:
                self._client.set_terminated(run_id, status="FAILED" if failed else "FINISHED")

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
    exp_id = experiment_id(mlflow_client, uri, experiment_name)
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
