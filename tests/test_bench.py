"""The overhead bench's CPU accounting, on made-up samples (pure logic, no Ray)."""

import pytest

from raysweep.bench.overhead import CpuWatch

W, RAYLET, GCS = "ray::RayTrainWorker", "raylet", "gcs_server"


def test_cpu_is_split_over_the_intervals_in_which_the_worker_trained():
    watch = CpuWatch(interval=1.0)
    samples = [
        {1: (W, 0.0), 2: (RAYLET, 0.0)},
        {1: (W, 0.9), 2: (RAYLET, 0.1)},                   # training: counted
        {1: (W, 0.95), 2: (RAYLET, 0.6)},                  # worker idle (0.05 s): skipped
        {1: (W, 1.85), 2: (RAYLET, 0.7), 3: (GCS, 0.2)},   # training; pid 3 started within it
    ]
    for before, after in zip(samples, samples[1:]):
        watch.add(before, after, 1.0)
    assert watch.worker_s == pytest.approx(1.8)  # sums of a few decimals: exact to rounding
    assert watch.others == pytest.approx({RAYLET: 0.2, GCS: 0.2})
    summary = watch.summary()
    assert summary["worker_share"] == pytest.approx(1.8 / 2.2, abs=1e-3)  # rounded to 3 places
    assert summary["others_share"] == pytest.approx(0.4 / 2.2, abs=1e-3)
    assert set(summary["top_others"]) == {RAYLET, GCS}


def test_no_training_interval_gives_no_figures():
    watch = CpuWatch()
    watch.add({1: (W, 0.0)}, {1: (W, 0.1)}, 1.0)
    assert watch.summary() is None


def test_the_sampler_sees_this_process():
    import os

    sample = CpuWatch._sample()
    name, cpu = sample[os.getpid()]
    assert "python" in name and cpu > 0
