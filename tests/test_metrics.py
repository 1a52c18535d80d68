"""top_k_error against an independent numpy computation; the epoch meter weighs samples."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from raysweep.trial.metrics import Meter, chance_top_k_error, clearly_below_chance, top_k_error, top_k_wrong


def numpy_top_k_error(logits: np.ndarray, targets: np.ndarray, k: int) -> float:
    """Rank of each row's target = number of logits strictly greater (ties: lower index wins,
    as torch.topk orders equal values), so the target is in the top k iff that rank < k."""
    n, c = logits.shape
    order = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    hit = (order == targets[:, None]).any(axis=1)
    return float(np.mean(~hit))


SHAPES = [(1, 2), (7, 3), (64, 10), (128, 100), (5, 1000), (33, 5), (200, 6)]


@pytest.mark.parametrize("n,c", SHAPES)
@pytest.mark.parametrize("k", [1, 2, 5, 10])
def test_top_k_error_matches_numpy(n, c, k):
    rng = np.random.default_rng(n * 1000 + c * 10 + k)
    logits = rng.standard_normal((n, c)).astype(np.float32)
    targets = rng.integers(0, c, size=n)
    got = top_k_error(torch.from_numpy(logits), torch.from_numpy(targets), k)
    want = 0.0 if k >= c else numpy_top_k_error(logits, targets, k)
    assert got == pytest.approx(want, abs=1e-12)
    assert 0.0 <= got <= 1.0


def test_k_at_or_above_classes_is_zero():
    logits = torch.randn(9, 4)
    targets = torch.randint(0, 4, (9,))
    assert top_k_error(logits, targets, 4) == 0.0
    assert top_k_error(logits, targets, 5) == 0.0
    # ... while k = classes - 1 can miss: put every target at the smallest logit.
    logits = torch.arange(4.0).repeat(9, 1)
    assert top_k_error(logits, torch.zeros(9, dtype=torch.long), 3) == 1.0


def test_known_values_and_ties():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.2], [0.2, 0.3, 0.5], [0.0, 0.4, 0.6]])
    targets = torch.tensor([1, 2, 0, 1])
    assert top_k_error(logits, targets, 1) == pytest.approx(3 / 4)  # only row 0 is right
    assert top_k_error(logits, targets, 2) == pytest.approx(1 / 4)  # row 2's target is last
    # A tie at the boundary is settled by torch.topk's own choice, whatever it is.
    tied = torch.tensor([[1.0, 1.0, 0.0]] * 2)
    chosen = torch.topk(tied, 1, dim=1).indices[0, 0].item()
    assert top_k_error(tied, torch.tensor([chosen, 1 - chosen]), 1) == pytest.approx(1 / 2)


def test_batches_with_a_short_last_batch_agree_with_the_whole():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((103, 20)).astype(np.float32)
    targets = rng.integers(0, 20, size=103)
    meter = Meter()
    for start in range(0, 103, 16):  # the last batch holds 7 rows
        lb, tb = torch.from_numpy(logits[start:start + 16]), torch.from_numpy(targets[start:start + 16])
        meter.add_counts(len(tb), top5=top_k_wrong(lb, tb, 5))
        meter.update(len(tb), top1=top_k_error(lb, tb, 1))
    m = meter.compute()
    assert meter.samples == 103 and meter.weights == {"top5": 103, "top1": 103}
    assert m["top5"] == pytest.approx(numpy_top_k_error(logits, targets, 5), abs=1e-12)
    assert m["top1"] == pytest.approx(numpy_top_k_error(logits, targets, 1), abs=1e-12)


def test_meter_weights_samples_not_batches():
    meter = Meter()
    meter.update(100, loss=1.0)
    meter.update(1, loss=torch.tensor(102.0))  # a tensor mean counts like a float
    assert meter.compute()["loss"] == pytest.approx((100 * 1.0 + 102.0) / 101)
    assert meter.compute()["loss"] != pytest.approx((1.0 + 102.0) / 2)
    with pytest.raises(ValueError):
        meter.update(0, loss=1.0)
    with pytest.raises(ValueError):
        Meter().compute()


def test_bad_input_is_refused():
    with pytest.raises(ValueError):
        top_k_error(torch.randn(3, 4), torch.zeros(2, dtype=torch.long), 1)
    with pytest.raises(ValueError):
        top_k_error(torch.randn(0, 4), torch.zeros(0, dtype=torch.long), 1)
    with pytest.raises(ValueError):
        top_k_error(torch.randn(3, 4), torch.zeros(3, dtype=torch.long), 0)


def test_clearly_below_chance():
    assert chance_top_k_error(100, 5) == pytest.approx(0.95)
    assert chance_top_k_error(4, 5) == 0.0
    # 100 classes, 10,000 validation images: the 0.02 floor decides (3 sigma is 0.0065).
    assert not clearly_below_chance(0.94, 100, 10_000)
    assert clearly_below_chance(0.92, 100, 10_000)
    # A small validation set needs a larger gap: 3 sigma of 0.95 on 200 images is 0.046.
    sigma3 = 3 * math.sqrt(0.95 * 0.05 / 200)
    assert not clearly_below_chance(0.95 - sigma3 + 1e-3, 100, 200)
    assert clearly_below_chance(0.95 - sigma3 - 1e-3, 100, 200)
