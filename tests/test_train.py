"""The trial loop: its pure parts directly, then whole trials through TorchTrainer on a CPU
worker (metrics, best-checkpoint test, resume after an injected failure).

The trials use the tiny learnable synthetic set (4 classes, 12 train images each) prepared
through the real pipeline; the model is the real AlexNet at 227 px, so each trial costs
tens of seconds on two cores.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from raysweep.trial.device_data import StreamSplit

METRICS = ["epoch", "lr", "train_loss", "train_top1_error", "train_top5_error", "val_loss",
           "val_top1_error", "val_top5_error", "images_per_sec", "n_train", "steps"]
TIMES = ["time_train_s", "time_eval_s", "time_checkpoint_s", "time_epoch_s", "time_report_s", "wall_time_s",
         "time_to_first_step_s", "time_startup_s", "time_data_load_s", "time_setup_s", "time_launch_s",
         "checkpointed"]
FINAL = ["test_loss", "test_top1_error", "test_top5_error", "best_epoch", "best_val_top5_error", "learned"]


def test_stream_split_delivers_the_same_rows(ray_session):
    import ray

    imgs = np.arange(23 * 4 * 4 * 3, dtype=np.int64).reshape(23, 4, 4, 3) % 251
    ds = ray.data.from_items([{"image": imgs[i].astype(np.uint8), "label": i} for i in range(23)])
    ds.context.execution_options.preserve_order = True  # as PreparedData.dataset sets it
    stream = StreamSplit(ds, 23, torch.device("cpu"))
    plain = [(x, y) for x, y in stream.batches(10)]
    assert [len(y) for _, y in plain] == [10, 10, 3]
    labels = torch.cat([y for _, y in plain])
    assert sorted(labels.tolist()) == list(range(23))
    for x, y in plain:
        assert torch.equal(x, torch.from_numpy(imgs[y.numpy()].astype(np.uint8)))
    order = lambda: torch.cat([y for _, y in stream.batches(10, order=torch.Generator().manual_seed(3))])
    shuffled = order()
    assert sorted(shuffled.tolist()) == list(range(23)) and torch.equal(shuffled, order())


# --- whole trials -------------------------------------------------------------------------

def _recorder_class():
    from ray.train import UserCallback

    class Recorder(UserCallback):
        """Runs in the Train controller: appends every epoch reported and every failure to a JSON-lines file."""

        def __init__(self, path: str):
            self.path = path

        def _write(self, row: dict) -> None:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")

        def after_report(self, run_context, metrics, checkpoint):
            from raysweep.trial.reporting import unpack

            # One report may carry several epochs; its checkpoint is its last epoch's.
            rows = unpack(metrics[0])
            for i, row in enumerate(rows):
                self._write({"report": row, "checkpoint": checkpoint.path if checkpoint and i == len(rows) - 1 else None})

        def after_exception(self, run_context, worker_exceptions):
            self._write({"exception": {str(k): repr(v) for k, v in worker_exceptions.items()}})

    return Recorder


@pytest.fixture(scope="module")
def prepared(ray_session, tmp_path_factory):
    from raysweep.data import prepare
    from raysweep.data.synthetic import write_synthetic

    src = write_synthetic(tmp_path_factory.mktemp("syn"), classes=4, train_per_class=12,
                          val_per_class=4, test_per_class=4, seed=0)
    return prepare(str(src), tmp_path_factory.mktemp("cache"), image_size=64, progress=False)


def run_trial(prepared, tmp_path: Path, name: str, fraction: float = 1.0, keep=None, sweep=None, **train):
    """Fit one trial (a narrow AlexNet at 64 px); returns (Result, reports in order, failures seen)."""
    import ray.train

    from raysweep.config import Config
    from raysweep.sweep.trainer import build_trainer

    cfg = Config.from_dict({"name": name, "data": {"image_size": 64}, "model": {"width": 0.25}, "train": {
        "epochs": 2, "batch_size": 16, "eval_batch_size": 64, "optimizer": "adamw", "lr": 1e-3,
        "schedule": "constant", "num_threads": 1, **train}, "sweep": {"checkpoint_every": 1, **(sweep or {})}})
    log = tmp_path / f"{name}.jsonl"
    run_config = ray.train.RunConfig(
        name=name, storage_path=str(tmp_path / "runs"), callbacks=[_recorder_class()(str(log))],
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=keep),
        failure_config=ray.train.FailureConfig(max_failures=1))
    result = build_trainer(cfg, prepared, fraction, 0, use_gpu=False, run_config=run_config).fit()
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    return result, [r for r in rows if "report" in r], [r for r in rows if "exception" in r]


@pytest.fixture(scope="module")
def plain(prepared, tmp_path_factory):
    return run_trial(prepared, tmp_path_factory.mktemp("plain"), "plain", epochs=4, sweep={"checkpoint_every": 2})


@pytest.mark.slow
def test_trial_reports_every_metric_and_where_its_time_went(plain):
    result, reports, failures = plain
    assert not failures and result.error is None
    metrics = [r["report"] for r in reports]
    assert [m["epoch"] for m in metrics] == [1, 2, 3, 4]
    for m in metrics:
        assert set(METRICS + TIMES) <= set(m), set(METRICS + TIMES) - set(m)
        assert m["n_train"] == 48
        assert m["lr"] == pytest.approx(1e-3)  # constant schedule: exactly the configured lr
        assert m["images_per_sec"] > 0
        for key in METRICS:
            if key.endswith("_error"):
                assert 0.0 <= m[key] <= 1.0, key
            if key.endswith("_loss"):
                assert math.isfinite(m[key]), key
        assert m["train_top5_error"] == m["val_top5_error"] == 0.0  # 4 classes: top-5 always hits
        # The parts fit inside the epoch's wall time (the clock is read around them).
        assert m["time_train_s"] + m["time_eval_s"] + m["time_checkpoint_s"] <= m["time_epoch_s"]
        assert 0 < m["time_data_load_s"] < m["time_startup_s"] < m["time_to_first_step_s"] < m["wall_time_s"]
    assert [m["checkpointed"] for m in metrics] == [False, True, False, True]  # every 2nd, and the last
    assert [m["steps"] for m in metrics] == [3, 6, 9, 12]  # 48 images in batches of 16
    walls = [m["wall_time_s"] for m in metrics]
    assert walls == sorted(walls)
    assert not set(FINAL) & set(metrics[0])  # test metrics only come with the last report
    last = metrics[-1]
    assert set(FINAL) <= set(last)
    assert metrics[-1]["train_loss"] < metrics[0]["train_loss"]
    assert 1 <= last["best_epoch"] <= 4 and isinstance(last["learned"], bool)
    assert last["select_metric"] == "val_top1_error" and last["num_classes"] == 4  # 4 < 50 classes: top-1
    assert last["best_val_error"] == metrics[last["best_epoch"] - 1]["val_top1_error"]
    assert last["max_epochs"] == 4 and last["stopped_early"] is False
    assert last["model"] == "alexnet(width=0.25)" and last["num_params"] == 3_572_948
    assert 0.0 <= last["test_top1_error"] <= 1.0 and math.isfinite(last["test_loss"])
    assert result.metrics["epoch"] == 4 and result.metrics["test_loss"] == last["test_loss"]


def _evaluate(weights: dict, prepared) -> dict:
    """An evaluation written apart from the loop: torchvision's AlexNet layout, numpy for the errors."""
    from raysweep.trial.model import build_model

    model = build_model(prepared.num_classes, 0.5, "alexnet", 0.25)
    model.load_state_dict(weights)
    model.eval()
    rows = prepared.dataset("test").take_all()
    x = np.stack([r["image"] for r in rows]).astype(np.float32) / 255.0
    x = (x - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    y = np.array([r["label"] for r in rows])
    with torch.no_grad():
        logits = model(torch.from_numpy(x.transpose(0, 3, 1, 2).astype(np.float32))).double()
    loss = F.cross_entropy(logits, torch.from_numpy(y)).item()
    return {"test_loss": loss, "test_top1_error": float(np.mean(logits.numpy().argmax(1) != y))}


@pytest.mark.slow
def test_the_best_validation_checkpoint_is_the_one_tested(prepared, tmp_path):
    from raysweep.data import stratified_subset
    from raysweep.trial.loop import BEST_FILE, STATE_FILE, load_best_weights

    # lr x100 after epoch 1 makes AdamW blow the model up: epoch 1 is the best, not the last.
    result, reports, _ = run_trial(prepared, tmp_path, "best", fraction=0.5,
                                   schedule="step", step_epochs=1, step_gamma=100.0)
    first, last = reports[0]["report"], reports[-1]["report"]
    assert last["n_train"] == len(stratified_subset(prepared.labels("train"), 0.5, 0)) == 24
    assert [r["report"]["lr"] for r in reports] == pytest.approx([1e-3, 1e-1])
    assert last["best_epoch"] == 1 and last["val_loss"] > first["val_loss"]
    assert last["best_val_top5_error"] == first["val_top5_error"]
    first_dir, last_dir = Path(reports[0]["checkpoint"]), Path(reports[-1]["checkpoint"])
    # The final checkpoint keeps only the best weights (nothing resumes from it); epoch 1's has it all.
    assert (last_dir / BEST_FILE).exists() and not (first_dir / BEST_FILE).exists()
    assert "optimizer" not in torch.load(last_dir / STATE_FILE, map_location="cpu", weights_only=True)
    epoch1 = torch.load(first_dir / STATE_FILE, map_location="cpu", weights_only=True)["model"]
    best = load_best_weights(last_dir)
    assert all(torch.equal(best[k], epoch1[k]) for k in epoch1)
    want = _evaluate(epoch1, prepared)
    # float32 CPU forward passes of the same weights on the same images: agreement to ~1e-6.
    assert last["test_loss"] == pytest.approx(want["test_loss"], rel=1e-4)
    assert last["test_top1_error"] == want["test_top1_error"]


@pytest.mark.slow
def test_a_failure_resumes_from_the_last_checkpoint_and_replays_its_epochs(prepared, tmp_path, plain):
    # Checkpoints at epochs 2 and 4; the failure after epoch 3 loses epoch 3's work.
    result, reports, failures = run_trial(prepared, tmp_path, "fails", epochs=4, fail_at_epoch=3,
                                          sweep={"checkpoint_every": 2})
    assert result.error is None
    assert len(failures) == 1 and "injected failure after epoch 3" in json.dumps(failures[0])
    epochs = [r["report"]["epoch"] for r in reports]
    # The retry replays what its checkpoint recorded (1, 2: the trial logs drop those Tune has),
    # then re-runs epoch 3 only: at most the epochs since the last checkpoint.
    assert epochs == [1, 2, 3, 1, 2, 3, 4]
    first, replay = [r["report"] for r in reports[:2]], [r["report"] for r in reports[3:5]]
    assert replay == first  # replayed exactly, timings included
    rerun, original = reports[5]["report"], reports[2]["report"]
    walls = [r["report"]["wall_time_s"] for r in reports[3:]]
    assert walls == sorted(walls) and rerun["wall_time_s"] > original["wall_time_s"]  # time sums over attempts
    # Resumed with epoch 2's RNG and optimizer state, the trial retraces the uninterrupted one.
    for got, want in zip([reports[5], reports[6]], plain[1][2:]):
        for key in ("train_loss", "val_loss", "train_top1_error", "val_top1_error"):
            # The same float32 CPU ops in the same order: equal up to BLAS threading noise.
            assert got["report"][key] == pytest.approx(want["report"][key], rel=1e-5, abs=1e-7), key
    assert set(FINAL) <= set(reports[-1]["report"])
