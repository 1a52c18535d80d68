"""The overhead bench's parts without Ray: its CPU accounting (made-up samples), the pause of a
real process tree, and the split of epochs around pauses and pairing of them."""

import statistics
import subprocess
import sys
import time

import pytest

from raysweep.bench.overhead import (CpuWatch, beside_over_alone, clear_of_pauses, paired_ratios, paused,
                                     split_by_pauses)

W, RAYLET, GCS = "ray::RayTrainWorker", "raylet", "gcs_server"


def test_cpu_is_split_over_the_intervals_in_which_the_worker_trained():
    watch = CpuWatch(interval=1.0)
    samples = [
        {1: (W, 0.0), 2: (RAYLET, 0.0)},
        {1: (W, 0.9), 2: (RAYLET, 0.1)},                   # training: counted
        {1: (W, 0.95), 2: (RAYLET, 0.6)},                  # worker idle (0.05 s): skipped
        {1: (W, 1.85), 2: (RAYLET, 0.7), 3: (GCS, 0.2)},   # training; pid 3 started within it
        {1: (W, 2.85), 2: (RAYLET, 1.7), 3: (GCS, 0.2)},   # training, but outside the span below
    ]
    for t, (before, after) in enumerate(zip(samples, samples[1:])):
        watch.add(before, after, float(t), t + 1.0)
    assert [x for iv in watch.intervals for x in iv[:3]] == pytest.approx([0.0, 1.0, 0.9, 2.0, 3.0, 0.9, 3.0, 4.0, 1.0])
    summary = watch.summary(spans=[(0.0, 3.5)])
    assert summary["worker_share"] == pytest.approx(1.8 / 2.2, abs=1e-3)  # rounded to 3 places
    assert summary["others_share"] == pytest.approx(0.4 / 2.2, abs=1e-3)
    assert summary["top_others"] == pytest.approx({RAYLET: round(0.2 / 2.2, 3), GCS: round(0.2 / 2.2, 3)})
    # Without spans, every busy interval: the raylet's second in the last one tips the split.
    assert watch.summary()["others_share"] == pytest.approx(1.4 / 4.2, abs=1e-3)


def test_no_training_interval_gives_no_figures():
    watch = CpuWatch()
    watch.add({1: (W, 0.0)}, {1: (W, 0.1)}, 0.0, 1.0)
    assert watch.summary() is None
    watch.add({1: (W, 0.0)}, {1: (W, 1.0)}, 5.0, 6.0)
    assert watch.summary(spans=[(0.0, 4.0)]) is None


def test_an_interval_closed_on_demand_splits_the_periodic_ones():
    import os

    watch = CpuWatch(interval=60.0)
    watch._sample = lambda: {os.getpid(): (W, time.process_time())}  # this process plays the worker
    with watch:
        time.sleep(0.2)
        end = time.process_time() + 0.3
        while time.process_time() < end:  # busy: an interval in which the "worker" trained
            pass
        watch.sample_now()
    (start, stop, worker_s, others), = watch.intervals
    assert stop - start >= 0.3 and worker_s == pytest.approx(stop - start, rel=0.5) and others == {}


def test_the_sampler_sees_this_process():
    import os

    sample = CpuWatch._sample()
    name, cpu = sample[os.getpid()]
    assert "python" in name and cpu > 0


def _row(epoch, end, train_s, rate):
    return {"epoch": epoch, "trained_at": end, "time_train_s": train_s, "images_per_sec": rate}


def test_epochs_that_overlap_a_pause_are_left_out_and_pauses_outside_the_trial_too():
    # Epochs train for 1 s each, epoch e over [e-1, e]. Pauses: 3.2-3.6 (epoch 4 overlaps it;
    # epoch 5 starts 0.4 s after it, within the 0.5 s settle), 6.0-6.2 (epoch 7; epoch 6 ends
    # as it starts) and 20-21 (after the trial: its loop epochs are not compared).
    rows = [_row(e, float(e), 1.0, 100.0 + e) for e in range(1, 11)]
    pauses = [(3.2, 3.6, [200.0, 201.0]), (6.0, 6.2, [202.0]), (20.0, 21.0, [999.0])]
    inside, outside = split_by_pauses(rows, pauses)
    assert inside == [102.0, 103.0, 106.0, 108.0, 109.0, 110.0]  # epoch 1 never counts
    assert outside == [200.0, 201.0, 202.0]
    assert 105.0 in split_by_pauses(rows, pauses, settle_s=0.0)[0]
    assert split_by_pauses([{"epoch": 1}], pauses) == ([], [])


def test_paired_ratios_cancel_a_drift_that_pooled_medians_do_not():
    # The machine doubles its speed at t=4.5 s: the trial runs at 0.9x the loop throughout (90
    # then 180 img/s; the loop 100 then 200), but the slow pause holds more loop epochs, so the
    # pooled medians say 1.8. Epochs 3, 5, 6 and 10 overlap or follow a pause and are left out.
    rows = [_row(e, float(e), 1.0, 90.0 if e <= 4 else 180.0) for e in range(1, 13)]
    pauses = [(2.2, 2.4, [100.0, 100.0, 100.0]), (4.5, 4.6, [200.0]), (9.1, 9.3, [200.0]),
              (30.0, 31.0, [1.0])]  # the last after the trial: not compared
    inside, outside = split_by_pauses(rows, pauses)
    assert statistics.median(inside) / statistics.median(outside) == pytest.approx(1.8)
    assert paired_ratios(rows, pauses) == pytest.approx([0.9, 0.9, 0.9])
    # A pause with fewer than two clean epochs between its neighbours gives no ratio: one more
    # at 3.1 s leaves epoch 2 alone before it, and nothing between it and its neighbours.
    crowded = pauses[:1] + [(3.1, 3.2, [100.0])] + pauses[1:]
    assert paired_ratios(rows, crowded) == pytest.approx([0.9, 0.9])
    assert paired_ratios([{"epoch": 1}], pauses) == []


def test_the_loop_beside_ray_is_compared_with_the_loop_alone_in_the_same_pause():
    rows = [_row(e, float(e), 1.0, 90.0) for e in range(1, 11)]  # training passes from 1 s to 10 s
    alone = [(2.2, 2.6, [100.0, 120.0]), (5.2, 5.6, [200.0, 200.0]), (7.2, 7.6, [100.0]),
             (8.2, 8.6, [100.0]), (30.0, 31.0, [100.0])]
    beside = [(2.2, 2.6, [88.0, 110.0]), (5.2, 5.6, [180.0, 170.0]), (7.2, 7.6, []),
              (8.2, 8.6, [50.0]), (30.0, 31.0, [50.0])]
    # 99/110, 175/200, none (no loop beside Ray: no worker was found), 50/100; the last pause is
    # after the trial.
    assert beside_over_alone(rows, alone, beside) == pytest.approx([0.9, 0.875, 0.5])
    assert beside_over_alone([{"epoch": 1}], alone, beside) == []


COUNTER = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time\\nwhile True: time.sleep(1)"])
while True:
    print(time.monotonic(), flush=True)
    time.sleep(0.02)
"""


@pytest.fixture
def counter():
    """A process printing the time every 20 ms, with a sleeping child: (Popen, parent, child)."""
    import ray  # noqa: F401
    import psutil

    proc = subprocess.Popen([sys.executable, "-c", COUNTER], stdout=subprocess.PIPE, text=True)
    try:
        proc.stdout.readline()
        time.sleep(0.5)  # the child is up
        parent = psutil.Process(proc.pid)
        (child,) = parent.children(recursive=True)
        yield proc, parent, child
    finally:
        for p in psutil.Process(proc.pid).children(recursive=True):
            p.kill()
        proc.kill()
        proc.wait()


def _first_line_after(proc, stamp: float) -> float:
    line = float(proc.stdout.readline())
    while line < stamp:
        line = float(proc.stdout.readline())
    return line


def test_a_paused_process_tree_stops_and_resumes(counter):
    import psutil

    proc, parent, child = counter
    with paused(proc.pid) as n:
        assert n == 2
        time.sleep(0.2)
        assert all(p.status() == psutil.STATUS_STOPPED for p in (parent, child))
        stamp = time.monotonic()
        time.sleep(0.5)
    assert all(p.status() != psutil.STATUS_STOPPED for p in (parent, child))
    # Nothing was printed while paused: the first line stamped after resuming comes later.
    assert _first_line_after(proc, stamp) > stamp + 0.5


def test_a_pause_can_stop_only_the_processes_chosen(counter):
    import psutil

    proc, parent, child = counter
    with paused(proc.pid, only=lambda p: p.pid == child.pid) as n:
        assert n == 1
        time.sleep(0.2)
        assert child.status() == psutil.STATUS_STOPPED
        assert parent.status() != psutil.STATUS_STOPPED
        # The parent goes on printing while its child is stopped.
        stamp = time.monotonic()
        assert _first_line_after(proc, stamp) < stamp + 0.5
    assert child.status() != psutil.STATUS_STOPPED


def test_the_overhead_leaves_out_epochs_a_pause_may_have_lengthened():
    # Epoch e (wall 1 s) finishes training at e - 0.5 s. The pause at 3.2-3.7 s stops the whole
    # sweep, so an epoch that holds it shows 0.5 s of overhead that was the bench's. Where an
    # epoch's wall lies around its training's end is not recorded; within one wall time either
    # side of it, it may hold the pause: epochs 3, 4 and 5 are left out.
    rows = [{"epoch": e, "trained_at": e - 0.5, "time_epoch_s": 1.0} for e in range(1, 7)]
    assert [r["epoch"] for r in clear_of_pauses(rows, [(3.2, 3.7, [100.0])])] == [1, 2, 6]
    assert clear_of_pauses(rows, []) == rows
    assert clear_of_pauses([{"epoch": 1}], [(0.0, 9.0, [])]) == [{"epoch": 1}]  # no timestamps: kept
