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

from raysweep.config import TrainConfig
from raysweep.train import DeviceSplit, Runner, StreamSplit, augment, epochs_for_budget, lr_factor

METRICS = ["epoch", "lr", "train_loss", "train_top1_error", "train_top5_error", "val_loss",
           "val_top1_error", "val_top5_error", "images_per_sec", "n_train"]
FINAL = ["test_loss", "test_top1_error", "test_top5_error", "best_epoch", "best_val_top5_error", "learned"]


# --- pure parts ---------------------------------------------------------------------------

def test_step_schedule_and_warmup_follow_progress():
    tc = TrainConfig(epochs=90, schedule="step", step_epochs=30, step_gamma=0.1, lr=0.01)
    f = lr_factor(tc, total_steps=90 * 10)  # 10 steps per epoch
    assert [f(s) for s in (0, 299, 300, 599, 600, 899)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    # "steps" budget: a subset 16x smaller runs 16x the epochs; the lr still drops after 1/3 of the run.
    tc = TrainConfig(epochs=90, budget="steps", batch_size=128, step_epochs=30)
    n_epochs = epochs_for_budget(tc, 3125, 50_000)
    assert n_epochs == round(90 * 391 / 25)  # 391 steps per full pass, 25 per subset pass
    f = lr_factor(tc, n_epochs * 25)
    third = n_epochs * 25 // 3
    assert f(third - 1) == 1.0 and f(third + 1) == pytest.approx(0.1)
    assert epochs_for_budget(TrainConfig(epochs=90), 3125, 50_000) == 90
    warm = lr_factor(TrainConfig(epochs=10, schedule="cosine", warmup_epochs=2), total_steps=100)
    assert warm(0) == pytest.approx(0.05 * (0.5 * (1 + math.cos(0))))  # 1 of 20 warm-up steps
    assert warm(9) < warm(19) and warm(20) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.2)))
    assert warm(100) == pytest.approx(0.0, abs=1e-12)


def test_augment_is_seeded_random_resized_crop_and_flip():
    ramp = torch.arange(64, dtype=torch.uint8).repeat(64, 1)  # value = x coordinate
    x = ramp[None, :, :, None].expand(16, 64, 64, 3).contiguous()

    def run(seed, **kw):
        return augment(x, torch.Generator().manual_seed(seed), kw.get("scale_min", 0.35), kw.get("hflip", True))

    a, b, c = run(0), run(0), run(1)
    assert a.shape == (16, 3, 64, 64) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= 0 and a.max() <= 63  # bilinear: within the input's range
    slope = (a[:, 0, 32, -1] - a[:, 0, 32, 0]).sign()
    assert (slope > 0).any() and (slope < 0).any()  # some images flipped, some not
    assert (run(0, hflip=False)[:, 0, 32, -1] > run(0, hflip=False)[:, 0, 32, 0]).all()
    # A crop keeps >= sqrt(scale_min * 3/4) of the width (area >= scale_min, aspect >= 3/4).
    span = (a[:, 0, 32, -1] - a[:, 0, 32, 0]).abs()
    assert (span >= math.sqrt(0.35 * 3 / 4) * 63 * 0.95 - 2).all() and (span < 60).any()


def test_evaluate_counts_every_row_once():
    torch.manual_seed(0)
    split = DeviceSplit(torch.randint(0, 256, (37, 227, 227, 3), dtype=torch.uint8), torch.randint(0, 7, (37,)))
    runner = Runner(TrainConfig(eval_batch_size=16), num_classes=7, seed=0, device=torch.device("cpu"),
                    total_steps=10)
    got = runner.evaluate(split)  # batches of 16, 16 and 5
    runner.model.eval()
    with torch.no_grad():
        logits = runner.model(runner.inputs(split.images, train=False))
    assert got["loss"] == pytest.approx(F.cross_entropy(logits, split.labels).item(), rel=1e-5)
    want = float((logits.argmax(1) != split.labels).float().mean())
    assert got["top1_error"] == pytest.approx(want)


def test_stream_split_delivers_the_same_rows(ray_session):
    import ray

    imgs = np.arange(23 * 4 * 4 * 3, dtype=np.int64).reshape(23, 4, 4, 3) % 251
    ds = ray.data.from_items([{"image": imgs[i].astype(np.uint8), "label": i} for i in range(23)])
    ds.context.execution_options.preserve_order = True  # as build_trainer's DataConfig sets it
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
        """Runs in the Train controller: appends every report and failure to a JSON-lines file."""

        def __init__(self, path: str):
            self.path = path

        def _write(self, row: dict) -> None:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")

        def after_report(self, run_context, metrics, checkpoint):
            self._write({"report": metrics[0], "checkpoint": checkpoint.path if checkpoint else None})

        def after_exception(self, run_context, worker_exceptions):
            self._write({"exception": {str(k): repr(v) for k, v in worker_exceptions.items()}})

    return Recorder


@pytest.fixture(scope="module")
def prepared(ray_session, tmp_path_factory):
    from raysweep.data import prepare
    from raysweep.synthetic import write_synthetic

    src = write_synthetic(tmp_path_factory.mktemp("syn"), classes=4, train_per_class=12,
                          val_per_class=4, test_per_class=4, seed=0)
    return prepare(str(src), tmp_path_factory.mktemp("cache"))


def run_trial(prepared, tmp_path: Path, name: str, fraction: float = 1.0, keep=None, **train):
    """Fit one trial; returns (Result, reports in order, failures seen)."""
    import ray.train

    from raysweep.config import Config
    from raysweep.train import build_trainer

    cfg = Config.from_dict({"name": name, "train": {
        "epochs": 2, "batch_size": 16, "eval_batch_size": 64, "optimizer": "adamw", "lr": 1e-4,
        "schedule": "constant", "num_threads": 1, **train}})
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
    return run_trial(prepared, tmp_path_factory.mktemp("plain"), "plain")


@pytest.mark.slow
def test_trial_reports_every_metric_and_learns(plain):
    result, reports, failures = plain
    assert not failures and result.error is None
    metrics = [r["report"] for r in reports]
    assert [m["epoch"] for m in metrics] == [1, 2]
    for m in metrics:
        assert set(METRICS) <= set(m)
        assert m["n_train"] == 48
        assert m["lr"] == pytest.approx(1e-4)
        assert m["images_per_sec"] > 0
        for key in METRICS:
            if key.endswith("_error"):
                assert 0.0 <= m[key] <= 1.0, key
            if key.endswith("_loss"):
                assert math.isfinite(m[key]), key
        assert m["train_top5_error"] == m["val_top5_error"] == 0.0  # 4 classes: top-5 always hits
    assert not set(FINAL) & set(metrics[0])  # test metrics only come with the last report
    assert set(FINAL) <= set(metrics[1])
    assert metrics[1]["train_loss"] < metrics[0]["train_loss"]
    assert metrics[1]["best_epoch"] in (1, 2) and isinstance(metrics[1]["learned"], bool)
    assert 0.0 <= metrics[1]["test_top1_error"] <= 1.0 and math.isfinite(metrics[1]["test_loss"])
    assert result.metrics["epoch"] == 2 and result.metrics["test_loss"] == metrics[1]["test_loss"]


def _evaluate(weights: dict, prepared) -> dict:
    """An evaluation written apart from the loop: torchvision AlexNet, numpy for the errors."""
    from torchvision.models import alexnet

    model = alexnet(weights=None, num_classes=prepared.num_classes)
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
    from raysweep.train import BEST_FILE, STATE_FILE, load_best_weights

    # lr x100 after epoch 1 makes AdamW blow the model up: epoch 1 is the best, not the last.
    result, reports, _ = run_trial(prepared, tmp_path, "best", fraction=0.5,
                                   schedule="step", step_epochs=1, step_gamma=100.0)
    last = reports[-1]["report"]
    assert last["n_train"] == len(stratified_subset(prepared.labels("train"), 0.5, 0)) == 24
    assert [r["report"]["lr"] for r in reports] == pytest.approx([1e-4, 1e-2])
    assert last["best_epoch"] == 1
    assert last["best_val_top5_error"] == reports[0]["report"]["val_top5_error"]
    first_dir, last_dir = Path(reports[0]["checkpoint"]), Path(reports[-1]["checkpoint"])
    assert (last_dir / BEST_FILE).exists() and not (first_dir / BEST_FILE).exists()
    epoch1 = torch.load(first_dir / STATE_FILE, map_location="cpu", weights_only=False)["model"]
    epoch2 = torch.load(last_dir / STATE_FILE, map_location="cpu", weights_only=False)["model"]
    best = load_best_weights(last_dir)
    assert all(torch.equal(best[k], epoch1[k]) for k in epoch1)

    want, other = _evaluate(epoch1, prepared), _evaluate(epoch2, prepared)
    assert last["test_loss"] == pytest.approx(want["test_loss"], rel=1e-4)
    assert last["test_top1_error"] == pytest.approx(want["test_top1_error"])
    assert last["test_loss"] != pytest.approx(other["test_loss"], rel=1e-3)


@pytest.mark.slow
def test_injected_failure_resumes_without_losing_or_repeating_an_epoch(prepared, tmp_path, plain):
    result, reports, failures = run_trial(prepared, tmp_path, "fails", fail_at_epoch=1)
    assert result.error is None
    assert len(failures) == 1 and "injected failure after epoch 1" in json.dumps(failures[0])
    assert [r["report"]["epoch"] for r in reports] == [1, 2]
    assert set(FINAL) <= set(reports[-1]["report"])
    # Resumed from epoch 1's checkpoint with its RNG state, the trial retraces the plain one.
    for got, want in zip(reports, plain[1]):
        for key in ("train_loss", "val_loss", "train_top1_error", "val_top1_error"):
            assert got["report"][key] == pytest.approx(want["report"][key], rel=1e-5, abs=1e-7), key
