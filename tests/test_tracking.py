"""raysweep.sweep.tracking: MLflow as an optional extra. Read back with MLflow's own MlflowClient
from a real local store, `sqlite:///` (MLflow 3's default; skipped without SQLAlchemy and alembic)
and `file:`: one run per trial, each epoch's metrics, the final test metrics, the analysis as a
parent run; the console's notes; and a one-line error without MLflow."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

from analysis import plot_scaling
from analysis import results as R
from raysweep.sweep import tracking as T
from raysweep.errors import RaysweepError

CFG = {"name": "smoke", "train": {"lr": 1e-4, "epochs": 3}, "sweep": {"fractions": [1.0, 0.5], "seeds": [0]}}


SQLITE_MISSING = [m for m in ("sqlalchemy", "alembic") if importlib.util.find_spec(m) is None]


@pytest.fixture(params=["sqlite", "file"])
def store(request, tmp_path) -> str:
    """A tracking URI of each kind MLflow 3 takes locally."""
    pytest.importorskip("mlflow")
    if request.param == "sqlite":
        if SQLITE_MISSING:
            pytest.skip(f"a sqlite MLflow store needs {' and '.join(SQLITE_MISSING)} (not installed; "
                        "see pyproject.toml's mlflow extra)")
        return f"sqlite:///{tmp_path / 'mlflow.db'}"
    return f"file:{tmp_path / 'mlruns'}"


def _no_mlflow(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))


def test_without_mlflow_the_error_is_one_line_saying_how_to_install(monkeypatch, tmp_path, capsys):
    _no_mlflow(monkeypatch)
    with pytest.raises(RaysweepError, match=r"needs MLflow, which is not installed: .* -m pip install -c constraints.txt "
                                            r"-e '\.\[mlflow\]' \(in the raysweep clone\)"):
        T.check_mlflow()
    assert plot_scaling.main([str(tmp_path), "--mlflow", f"file:{tmp_path}/mlruns"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "-m pip install -c constraints.txt -e '.[mlflow]'" in err[0]


def test_tracking_uris(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    assert T.tracking_uri(str(tmp_path / "mlruns")) == (tmp_path / "mlruns").as_uri()
    assert T.tracking_uri("file:/x/mlruns") == "file:/x/mlruns"
    with pytest.raises(RaysweepError, match="not a tracking URI"):
        T.tracking_uri("mlruns:abc")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "sqlalchemy" else real(name, *a))
    with pytest.raises(RaysweepError, match=r"a sqlite store needs SQLAlchemy and alembic; sqlalchemy (and alembic )?(is|are) not installed"):
        T.tracking_uri("sqlite:///x.db")


def test_the_console_says_where_it_logs_and_what_a_file_store_needs(tmp_path):
    pytest.importorskip("mlflow")
    (where, note) = T.notes(f"file:{tmp_path}/mlruns", "each trial logged as a run of experiment 'x'")
    assert where == f"MLflow: each trial logged as a run of experiment 'x' to file:{tmp_path}/mlruns"
    assert "MLFLOW_ALLOW_FILE_STORE=true" in note and "reading the store back" in note and "sqlite:///" in note
    if not SQLITE_MISSING:
        assert T.notes("sqlite:///m.db", "runs") == ["MLflow: runs to sqlite:///m.db"]


def test_config_becomes_dotted_params():
    assert T.flat_params(CFG) == {"name": "smoke", "train.lr": "0.0001", "train.epochs": "3",
                                  "sweep.fractions": "[1.0, 0.5]", "sweep.seeds": "[0]"}


class _Trial:
    """What a Tune callback reads of a trial."""

    def __init__(self, trial_id: str, fraction: float, seed: int):
        self.trial_id, self.config, self.local_path = trial_id, {"fraction": fraction, "seed": seed}, "/tmp"

    def __str__(self):
        return f"run_trial_{self.trial_id}"


def _epochs(fraction: float, seed: int, epochs=(1, 2, 3)) -> list[dict]:
    out = []
    for e in epochs:
        r = {"epoch": e, "n_train": int(48 * fraction), "train_loss": 2.0 / e, "val_top1_error": 0.6 / e + seed / 100,
             "time_epoch_s": 0.5, "training_iteration": e, "config": {"fraction": fraction}, "hostname": "h"}
        if e == epochs[-1]:
            r.update(test_top1_error=0.25 + seed / 100, test_loss=1.1, learned=True, model="alexnet")
        out.append(r)
    return out


def _check_store(uri: str, experiment: str, expected: dict[tuple, list[dict]]) -> list:
    """One finished run per trial, with its params, every epoch's metric and the final metrics,
    read as a user would: MLflow's own client on the URI."""
    from mlflow import MlflowClient

    if uri.startswith("file:"):  # what the console's note tells a reader of a file: store
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no MLflow experiment {experiment!r} in {uri}"
    runs = [r for r in client.search_runs([exp.experiment_id]) if "raysweep.trial_id" in r.data.tags]
    assert len(runs) == len(expected)
    for run in runs:
        p = run.data.params
        key = (float(p["fraction"]), int(p["seed"]))
        reports = expected[key]
        assert p["n_train"] == str(reports[0]["n_train"])
        assert run.info.status == "FINISHED"
        history = client.get_metric_history(run.info.run_id, "val_top1_error")
        assert sorted((m.step, m.value) for m in history) == [(r["epoch"], pytest.approx(r["val_top1_error"]))
                                                               for r in reports]
        final = run.data.metrics
        assert final["test_top1_error"] == pytest.approx(reports[-1]["test_top1_error"])
        assert "training_iteration" not in final and "hostname" not in final
    return runs


def test_one_run_per_trial_and_a_resumed_trial_keeps_its_run(store):
    uri = store
    trials = [_Trial("a_00000", 1.0, 0), _Trial("a_00001", 0.5, 0)]
    cb = T.tune_callback(uri, "sweep-a", CFG)
    cb.setup()
    expected = {}
    for t in trials:
        f, s = t.config["fraction"], t.config["seed"]
        expected[(f, s)] = _epochs(f, s)
        cb.log_trial_start(t)
        for i, r in enumerate(expected[(f, s)][:2] if f == 1.0 else expected[(f, s)], 1):
            cb.log_trial_result(i, t, r)
        cb.log_trial_end(t, failed=f == 1.0)  # the first trial is interrupted after epoch 2
    # The sweep is resumed in a new process: a new callback, and the trial continues its run.
    again = T.tune_callback(uri, "sweep-a", CFG)
    again.setup()
    again.log_trial_start(trials[0])
    again.log_trial_result(3, trials[0], expected[(1.0, 0)][2])
    again.log_trial_end(trials[0])
    runs = _check_store(uri, "sweep-a", expected)
    assert runs[0].data.params["train.lr"] == "0.0001"


def test_plot_scaling_logs_its_files_as_the_parent_of_the_trial_runs(tmp_path, monkeypatch, store, capsys):
    from test_analysis import modern_experiment

    uri = store
    exp = modern_experiment(tmp_path / "sweep-b")
    cb = T.tune_callback(uri, "sweep-b", CFG)
    cb.setup()
    for t in (_Trial("b_00000", 1.0, 0), _Trial("b_00001", 0.5, 0)):
        cb.log_trial_start(t)
        cb.log_trial_end(t)
    monkeypatch.setattr(R, "load_experiment", lambda path: exp)
    out = tmp_path / "out"
    assert plot_scaling.main([str(exp.path), "--out", str(out), "--bootstrap", "20", "--mlflow", uri]) == 0
    printed = capsys.readouterr().out
    assert f"of experiment 'sweep-b' to {uri}" in printed
    assert ("MLFLOW_ALLOW_FILE_STORE" in printed) == uri.startswith("file:")
    client = T.client(uri)
    exp_id = client.get_experiment_by_name("sweep-b").experiment_id
    (parent,) = client.search_runs([exp_id], "tags.`raysweep.kind` = 'analysis'")
    logged = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert logged == set(plot_scaling.OUTPUTS)
    if uri.startswith("sqlite:"):  # beside the database, not in whatever directory the test runs in
        assert client.get_experiment(exp_id).artifact_location == (tmp_path / "mlartifacts" / "sweep-b").as_uri()
        assert {p.name for p in (tmp_path / "mlartifacts" / "sweep-b").rglob("*") if p.is_file()} == set(
            plot_scaling.OUTPUTS)
    fit = json.loads((out / "fit.json").read_text())["fit"]
    assert parent.data.metrics["law_alpha"] == pytest.approx(fit["alpha"])
    children = client.search_runs([exp_id], "tags.`raysweep.trial_id` != ''")
    assert len(children) == 2 and all(c.data.tags[T.PARENT_TAG] == parent.info.run_id for c in children)


@pytest.mark.slow
def test_a_real_tune_run_logs_each_trial(ray_session, tmp_path, store):
    """Ray Tune drives the callback: a function trainable, 2 trials of 3 epochs, no Train."""
    from ray import tune

    def trainable(config):  # nested, so Ray ships it by value: workers cannot import this test module
        from ray import tune

        f, s = config["fraction"], config["seed"]
        for e in (1, 2, 3):
            r = {"epoch": e, "n_train": int(48 * f), "train_loss": 2.0 / e, "val_top1_error": 0.6 / e + s / 100,
                 "time_epoch_s": 0.5}
            if e == 3:
                r.update(test_top1_error=0.25 + s / 100, test_loss=1.1, learned=True, model="alexnet")
            tune.report(r)

    uri = store
    tuner = tune.Tuner(trainable, param_space={"fraction": tune.grid_search([1.0, 0.5]), "seed": 0},
                       run_config=tune.RunConfig(name="trk", storage_path=str(tmp_path / "results"), verbose=0,
                                                 callbacks=[T.tune_callback(uri, "trk", CFG)]))
    grid = tuner.fit()
    assert not grid.errors
    expected = {(f, 0): _epochs(f, 0) for f in (1.0, 0.5)}  # what the trainable reports
    _check_store(uri, "trk", expected)


@pytest.mark.slow
def test_the_smoke_sweep_is_in_its_mlflow_store(smoke_experiment):
    """The session's smoke sweep runs with --mlflow file:<its parent>/mlruns when MLflow is installed."""
    pytest.importorskip("mlflow")
    store = Path(smoke_experiment).parent / "mlruns"
    if not store.exists():
        pytest.skip(f"the smoke sweep was run without --mlflow (no {store})")
    out = (Path(smoke_experiment).parent / "cli_stdout.txt").read_text()
    assert f"MLflow: each trial logged as a run of experiment 'smoke' to file:{store}\n" in out
    assert "MLFLOW_ALLOW_FILE_STORE=true" in out  # the note on what reading a file: store needs
    exp = R.load_experiment(smoke_experiment)
    expected = {}
    for t in exp.trials.itertuples():
        rows = [json.loads(line) for line in (Path(t.path) / "result.json").read_text().splitlines() if line.strip()]
        by_epoch = {r["epoch"]: r for r in rows}
        expected[(t.fraction, t.seed)] = [by_epoch[e] for e in sorted(by_epoch)]
    _check_store(store.as_uri(), Path(smoke_experiment).name, expected)
