"""The stop rule (raysweep.trial.stopping) on made-up curves: robust to validation noise, and
never stopping a trial whose training loss still falls fast, whatever its subset size."""

from __future__ import annotations

import numpy as np

from raysweep.config import TrainConfig
from raysweep.trial.stopping import StopRule

METRIC = "val_top1_error"


def run(rule: StopRule, val, train_loss, steps_per_epoch: int) -> tuple[str, int]:
    """Feed epochs until the rule stops; returns (decision, epoch)."""
    for e, (v, loss) in enumerate(zip(val, train_loss), 1):
        m = {METRIC: v, "val_top1_error": v, "val_top5_error": v, "val_loss": v, "train_loss": loss}
        rule.improved(e, m, e * steps_per_epoch)
        d = rule.decide(e, e * steps_per_epoch)
        if d == "stop":
            return d, e
    return "go", len(val)


def test_validation_noise_stops_the_raw_rule_early_and_the_smoothed_one_later():
    """A validation error still falling (0.2 + 0.6 exp(-e/25)) behind +-0.05 noise, as a
    400-image split gives: the raw rule stops whenever a lucky epoch is not beaten for 5 epochs;
    the smoothed one follows the trend. Over 30 noise draws, it stops much later, near where
    the curve flattens. The training loss is flat, so only the validation curve decides."""
    stops = {0.0: [], 0.7: []}
    e = np.arange(1, 121)
    for seed in range(30):
        val = 0.2 + 0.6 * np.exp(-e / 25) + np.random.default_rng(seed).uniform(-0.05, 0.05, e.size)
        for a in stops:
            rule = StopRule(TrainConfig(patience=5, val_smoothing=a, stop_loss_slope=0.0), METRIC, pass_steps=10)
            stops[a].append(run(rule, val, [1.0] * e.size, 10)[1])
    raw, smooth = np.median(stops[0.0]), np.median(stops[0.7])
    assert raw < 45 and smooth > raw + 12, (raw, smooth)  # measured: medians 37.5 and 56


def test_no_stop_while_the_training_loss_still_falls_fast():
    """A plateau of the validation error while the training loss falls 0.2 nats per epoch: the
    rule waits until the fall slows below stop_loss_slope (0.05), then stops."""
    val = [0.9 - 0.05 * e for e in range(6)] + [0.6] * 54  # best at epoch 7 (0.6), flat after
    loss = [2.0 - 0.2 * e for e in range(20)] + [-2.0 + 0.0 * e for e in range(40)]  # falling, then flat
    loss = [max(x, 0.1) for x in loss]
    tc = TrainConfig(patience=3, val_smoothing=0.0, stop_loss_slope=0.05)
    rule = StopRule(tc, METRIC, pass_steps=10)
    decision, epoch = run(rule, val, loss, 10)
    assert decision == "stop"
    # The loss reaches its floor (0.1) at epoch 11. The slope is fitted over the last 6 epochs
    # (max(6, 2 x 3)): at epoch 14 the window holds 0.4, 0.2, 0.1, 0.1, 0.1, 0.1, a least-squares
    # fall of 0.051, still above 0.05; at epoch 15, 0.2 then five 0.1s, it is 0.014: the stop.
    assert epoch == 15 and abs(rule.slope - 0.1 / 7) < 1e-9
    off = StopRule(TrainConfig(patience=3, val_smoothing=0.0, stop_loss_slope=0.0), METRIC, pass_steps=10)
    assert run(off, val, loss, 10) == ("stop", 10)  # without the guard: 3 epochs after the best


def test_the_loss_slope_is_per_epoch_whatever_the_epochs_steps():
    """The slope is the training loss's fall per epoch of the trial's own subset, fitted over
    its recent epochs, whether an epoch is 10 steps or 1."""
    for steps_per_epoch in (10, 1):
        rule = StopRule(TrainConfig(patience=4, stop_loss_slope=0.02), METRIC, pass_steps=10)
        for e in range(1, 9):
            rule.improved(e, {METRIC: 0.5, "val_top1_error": .5, "val_top5_error": .5, "val_loss": 1,
                              "train_loss": 2 - 0.03 * e}, steps_per_epoch * e)
        assert abs(rule.slope - 0.03) < 1e-9 and rule.still_learning()


def test_the_rule_resumes_from_its_state():
    val = [0.6, 0.55, 0.5, 0.52, 0.51, 0.53, 0.54, 0.55, 0.56, 0.57]
    loss = [1.0] * 10
    tc = TrainConfig(patience=3, val_smoothing=0.5, stop_loss_slope=0.02)
    whole = StopRule(tc, METRIC, pass_steps=5)
    expected = run(whole, val, loss, 5)
    first = StopRule(tc, METRIC, pass_steps=5)
    run(first, val[:4], loss[:4], 5)
    second = StopRule(tc, METRIC, pass_steps=5)
    second.load_state_dict(first.state_dict())
    for e in range(5, 11):
        m = {METRIC: val[e - 1], "val_top1_error": val[e - 1], "val_top5_error": val[e - 1], "val_loss": 1,
             "train_loss": 1.0}
        second.improved(e, m, 5 * e)
        if second.decide(e, 5 * e) == "stop":
            break
    assert ("stop", e) == expected and second.state_dict() == whole.state_dict()


def test_the_slope_is_a_fit_over_the_window_not_two_noisy_endpoints():
    """An augmented training loss falls 0.03 nats per epoch behind +-0.06 epoch-to-epoch noise,
    as the demo's largest subset's does. Two endpoints `patience` (3) epochs apart often read
    the fall as flat (below 0.02) and let the trial stop; the least-squares slope over
    max(6, 2 x patience) epochs reads it as falling on most epochs."""
    from raysweep.trial.stopping import loss_window

    assert loss_window(3) == 6 and loss_window(5) == 10
    e = np.arange(1, 61)
    flat_endpoints = flat_fit = 0
    for seed in range(20):
        loss = 3.0 - 0.03 * e + np.random.default_rng(seed).uniform(-0.06, 0.06, e.size)
        rule = StopRule(TrainConfig(patience=3, stop_loss_slope=0.02), METRIC, pass_steps=10)
        for i, x in enumerate(loss, 1):
            rule.improved(i, {METRIC: .5, "val_top1_error": .5, "val_top5_error": .5, "val_loss": 1,
                              "train_loss": float(x)}, 10 * i)
            if i >= 6:
                flat_fit += not rule.still_learning()
                flat_endpoints += (loss[i - 4] - loss[i - 1]) / 3 < 0.02
    epochs = 20 * 55
    # Measured: the endpoint rule reads 29% of epochs as flat, the fit 12%.
    assert flat_endpoints > 0.22 * epochs and flat_fit < 0.17 * epochs, (flat_endpoints, flat_fit)


def test_a_nan_loss_is_left_out_of_the_fit_and_too_few_points_wait():
    rule = StopRule(TrainConfig(patience=3, stop_loss_slope=0.02), METRIC, pass_steps=1)
    for i, x in enumerate([2.0, float("nan")], 1):
        rule.improved(i, {METRIC: .5, "val_top1_error": .5, "val_top5_error": .5, "val_loss": 1,
                          "train_loss": x}, i)
    assert np.isnan(rule.slope) and rule.still_learning()
    for i, x in enumerate([1.9, 1.8], 3):
        rule.improved(i, {METRIC: .5, "val_top1_error": .5, "val_top5_error": .5, "val_loss": 1,
                          "train_loss": x}, i)
    # Epochs 1, 3 and 4 (2.0, 1.9, 1.8) fitted on their own epoch numbers: 0.064 per epoch.
    assert abs(rule.slope - 0.0642857) < 1e-6


def test_the_wait_for_a_falling_loss_is_bounded():
    """A subset being memorised: the validation error flat after epoch 7 while the training loss
    falls 0.05 nats per epoch for ever. The guard waits stop_loss_patience x patience epochs
    (4 x 3) past the last smoothed best, then stops; with 0 it never stops."""
    val = [0.9 - 0.05 * e for e in range(6)] + [0.6] * 54
    loss = [3.0 - 0.05 * e for e in range(60)]
    bounded = StopRule(TrainConfig(patience=3, val_smoothing=0.0, stop_loss_slope=0.02), METRIC, pass_steps=10)
    assert run(bounded, val, loss, 10) == ("stop", 7 + 12) and bounded.still_learning()  # best: epoch 7
    unbounded = StopRule(TrainConfig(patience=3, val_smoothing=0.0, stop_loss_slope=0.02, stop_loss_patience=0),
                         METRIC, pass_steps=10)
    assert run(unbounded, val, loss, 10) == ("go", 60)
