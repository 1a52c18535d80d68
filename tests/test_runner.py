"""The trial's pure parts, without Ray: schedules, augmentation, evaluation, plateaus, the
fp32 head, best-weight capture and the device split's batches."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from raysweep.config import TrainConfig
from raysweep.trial.device_data import DeviceSplit
from raysweep.trial.runner import BestWeights, Runner, augment, epochs_for_budget, lr_factor

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
    split = DeviceSplit(torch.randint(0, 256, (37, 64, 64, 3), dtype=torch.uint8), torch.randint(0, 7, (37,)))
    runner = Runner(TrainConfig(eval_batch_size=16), num_classes=7, seed=0, device=torch.device("cpu"),
                    total_steps=10, model=("alexnet", 0.25))
    got = runner.evaluate(split)  # batches of 16, 16 and 5
    runner.model.eval()
    with torch.no_grad():
        logits = runner.model(runner.inputs(split.images, train=False))
    assert got["loss"] == pytest.approx(F.cross_entropy(logits, split.labels).item(), rel=1e-5)
    want = float((logits.argmax(1) != split.labels).float().mean())
    assert got["top1_error"] == pytest.approx(want)


def _runner(**train) -> Runner:
    tc = TrainConfig(**{"batch_size": 8, "eval_batch_size": 16, "optimizer": "sgd", "lr": 0.1, **train})
    return Runner(tc, num_classes=5, seed=0, device=torch.device("cpu"), total_steps=100, model=("alexnet", 0.125))


def test_a_plateau_drop_scales_the_lr_now_and_survives_a_checkpoint():
    runner = _runner(schedule="constant")
    assert runner.opt.param_groups[0]["lr"] == pytest.approx(0.1)
    runner.drop_lr(0.2)
    assert runner.opt.param_groups[0]["lr"] == pytest.approx(0.02)  # applies before the next step
    split = DeviceSplit(torch.randint(0, 256, (16, 64, 64, 3), dtype=torch.uint8), torch.arange(16) % 5)
    out = runner.train_epoch(split)
    assert out["lr"] == pytest.approx(0.02) and out["steps"] == 2 and out["time_train_s"] > 0
    again = _runner(schedule="constant")
    again.load_state_dict(runner.state_dict())
    assert again.lr_scale == pytest.approx(0.2) and again.steps == 2
    again.train_epoch(split)
    assert again.opt.param_groups[0]["lr"] == pytest.approx(0.02)


def test_best_weights_are_a_copy_not_a_view():
    runner = _runner()
    best = BestWeights(runner.model)
    best.capture(runner.model)
    before = {k: v.clone() for k, v in best.ready().items()}
    with torch.no_grad():
        for p in runner.model.parameters():
            p.add_(1.0)
    after = best.ready()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not torch.equal(after["classifier.6.weight"], runner.model.state_dict()["classifier.6.weight"])


def test_device_split_batches_cover_every_row_once_in_a_seeded_order():
    split = DeviceSplit(torch.zeros((23, 2, 2, 3), dtype=torch.uint8), torch.arange(23))
    plain = [y for _, y in split.batches(10)]
    assert [len(y) for y in plain] == [10, 10, 3] and torch.equal(torch.cat(plain), torch.arange(23))
    order = lambda: torch.cat([y for _, y in split.batches(10, order=torch.Generator().manual_seed(3))])
    a, b = order(), order()
    assert torch.equal(a, b) and sorted(a.tolist()) == list(range(23)) and not torch.equal(a, torch.arange(23))


def test_scale_one_only_flips_and_resamples_nothing():
    x = torch.randint(0, 256, (64, 8, 8, 3), dtype=torch.uint8)
    out = augment(x, torch.Generator().manual_seed(0), 1.0, True)
    plain, mirrored = x.permute(0, 3, 1, 2).float(), x.permute(0, 3, 1, 2).float().flip(3)
    same = [(o == p).all().item() for o, p in zip(out, plain)]
    flipped = [(o == m).all().item() for o, m in zip(out, mirrored)]
    assert all(a or b for a, b in zip(same, flipped))  # every image exact: kept or mirrored
    assert 16 < sum(flipped) < 48  # about half flipped (64 fair coins: 16..48 is > 99.9% likely)
    assert torch.equal(augment(x, torch.Generator().manual_seed(0), 1.0, False), plain)



FAULTS_SCRIPT = """
import resource, sys, torch
import raysweep.trial.runner as rr
if sys.argv[1] == "plain":
    rr.keep_freed_memory = lambda: False  # the loop as it was
from raysweep.config import TrainConfig
from raysweep.trial.device_data import DeviceSplit
torch.set_num_threads(2)
tc = TrainConfig(epochs=1, batch_size=32, optimizer="adamw", lr=1e-3, schedule="constant")
g = torch.Generator().manual_seed(0)
split = DeviceSplit(torch.randint(0, 256, (128, 64, 64, 3), dtype=torch.uint8, generator=g), torch.arange(128) % 10)
runner = rr.Runner(tc, 10, 0, torch.device("cpu"), 1000, model=("alexnet", 0.25))
runner.train_epoch(split)  # first touch of weights and optimizer state
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    runner.train_epoch(split)
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // (3 * 4))
"""


@pytest.mark.slow  # a real run of its own, ~10 s: make test-e2e
def test_a_cpu_step_reuses_freed_memory_instead_of_faulting_it_in_again():
    """glibc gives a step's freed activations back to the kernel and faults them in again at
    the next step, page by page (kernel time a small CPU trial lost), unless the process keeps
    freed memory, as the Runner makes it do. Counted in page faults per step of the real loop,
    each way in a fresh process."""
    import subprocess
    import sys

    from raysweep.trial.runner import keep_freed_memory

    if not keep_freed_memory():
        pytest.skip("not glibc: its malloc settings do not apply")

    def faults_per_step(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", FAULTS_SCRIPT, mode], capture_output=True, text=True,
                             timeout=300, check=True)
        return int(out.stdout.strip().splitlines()[-1])

    plain, kept = faults_per_step("plain"), faults_per_step("kept")
    assert plain > 1000  # measured here: ~4,700 (64 px, batch 32)
    assert kept < plain / 10  # measured here: 0-44


THREAD_FAULTS_SCRIPT = """
import ctypes, resource, threading
import raysweep.trial.runner as rr

libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
MB = 1 << 20

def loop(out):
    rr.keep_freed_memory()
    # What the worker's thread already holds (weights, buffers): 40 MB of its arena's first heap.
    held = [libc.malloc(MB) for _ in range(40)]
    for _ in range(5):  # a step's activations: 30 MB that do not fit that heap, written, freed
        before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
        block = libc.malloc(30 * MB)
        ctypes.memset(block, 1, 30 * MB)
        libc.free(block)
        out.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before)
    for block in held:
        libc.free(block)

out = []
t = threading.Thread(target=loop, args=(out,))
t.start(); t.join()
print(" ".join(map(str, out)))
"""


@pytest.mark.slow  # a real run of its own, ~10 s: make test-e2e
def test_a_cpu_trial_worker_loop_in_a_thread_keeps_its_memory_too():
    """Train runs the loop in a thread of its own. glibc gives such a thread an arena made of
    64 MB heaps and unmaps a heap whenever it empties, whatever mallopt says: when a step's
    activations did not fit the heap that held the weights, every step mapped a fresh heap and
    faulted it in again (2 of 5 trials here, ~180,000 faults/s). A CPU trial's workers start
    with `worker_env_vars` (one arena, the main one, which keep_freed_memory governs): counted
    in page faults per step, in fresh processes with and without it. The blocks come from
    glibc's malloc, as torch's CPU tensors do (theirs through posix_memalign, whose own fitting
    rules made a torch version of this test vary from run to run)."""
    import os
    import subprocess
    import sys

    from raysweep.trial.runner import keep_freed_memory
    from raysweep.sweep.trainer import worker_env_vars

    if not keep_freed_memory():
        pytest.skip("not glibc: its malloc settings do not apply")

    def faults(env: dict) -> list[int]:
        base = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
        out = subprocess.run([sys.executable, "-c", THREAD_FAULTS_SCRIPT], capture_output=True, text=True,
                             timeout=120, check=True, env={**base, **env})
        return [int(n) for n in out.stdout.split()]

    env = worker_env_vars(2, use_gpu=False)
    assert env["OMP_NUM_THREADS"] == "2" and "OMP_NUM_THREADS" not in worker_env_vars(1, use_gpu=False)
    assert "MALLOC_ARENA_MAX" not in worker_env_vars(1, use_gpu=True)
    plain, one_arena = faults({}), faults(env)
    # 30 MB is 7,680 pages; measured here: 7,681 faults on every pass without, 0 after the first with.
    assert min(plain[1:]) > 1000
    assert max(one_arena[1:]) < 100
