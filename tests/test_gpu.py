"""GPU memory and precision: budgets, residency, the auto packing rule, the CUDA preflight and
`python -m raysweep.bench gpu`. Pure logic is tested here on the CPU; tests marked `gpu` need a
CUDA GPU and are skipped, with their reason, where there is none."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, run_cli
from raysweep.cluster.resources import physical_gpus, plan_resources
from raysweep.cluster.connect import trial_nodes
from raysweep.errors import RaysweepError
from raysweep.cluster.gpu import (CUDA_CONTEXT_BYTES, DEFAULT_RESERVE_BYTES, GIB, SLACK, Footprint, auto_gpu_shares,
                          bytes_by_split, choose_precision, memory_budget, need_by_fraction, plan_residency,
                          probe_cuda,
                          stream_bytes, summarize_cuda_probes, training_reserve_bytes, trial_rows)

NO_GPU = physical_gpus() == 0


def needs_gpu(why: str):
    """Mark a test `gpu` and skip it, saying why it needs one, on a machine without a GPU."""
    def mark(fn):
        return pytest.mark.gpu(pytest.mark.skipif(NO_GPU, reason=f"needs an NVIDIA GPU with CUDA {why}; "
                                                                 "this machine has none")(fn))
    return mark

# mini-ImageNet: 100 classes x 500 training images; validation 10,000 and test 5,000, at 227 px.
LABELS = np.repeat(np.arange(100), 500)
# Device memory as torch reports it (get_device_properties().total_memory), in GiB.
CARDS = {"H200 141GB": 139.8, "A100 80GB": 79.2, "A100 40GB": 39.4, "RTX 4090 24GB": 23.6, "A10 24GB": 22.0}


FRACTIONS = [1.0, 0.5, 0.25, 0.125, 0.0625]
NEED = need_by_fraction(LABELS, 10_000, 5_000, FRACTIONS, 227, DEFAULT_RESERVE_BYTES)


# --- sizes and the reserve ----------------------------------------------------------------

def test_mini_imagenet_split_sizes_at_227_px():
    rows = trial_rows(LABELS, 1.0, 10_000, 5_000)
    assert rows == {"train": 50_000, "validation": 10_000, "test": 5_000}
    b = bytes_by_split(rows, 227)
    # 227*227*3 + 8 bytes a row: the 7.7 / 1.5 / 0.8 GB.
    assert (b["train"], b["validation"], b["test"]) == (7_729_750_000, 1_545_950_000, 772_975_000)
    assert NEED[1.0] == sum(b.values()) + DEFAULT_RESERVE_BYTES
    # 1/16 keeps round(500/16) = 31 images of each class.
    assert trial_rows(LABELS, 0.0625, 10_000, 5_000)["train"] == 3_100


@pytest.fixture(scope="module")
def alexnet_footprints():
    """AlexNet (100 classes, 227 px) measured in fp32 and bf16, with what the caller had before."""
    import torch

    from raysweep.cluster.gpu import measure_footprint
    from raysweep.trial.model import build_model

    model = build_model(100)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    fps = {p: measure_footprint(model, 227, p) for p in ("fp32", "bf16")}
    return fps, model, before, rng, torch.get_rng_state()


def test_alexnet_footprint_is_measured_from_saved_tensors_and_leaves_the_caller_untouched(alexnet_footprints):
    import torch

    fps, model, before, rng, rng_after = alexnet_footprints
    fp32, bf16 = fps["fp32"], fps["bf16"]
    assert torch.equal(rng_after, rng)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # torchvision AlexNet with a 100-class head: 61,100,840 - 4096*900 - 900 parameters.
    assert fp32.params == bf16.params == 61_100_840 - 4096 * 900 - 900
    # conv1's ReLU output alone (64x55x55 floats) is saved per image; bf16 halves the widths.
    assert fp32.largest_activation_per_image >= 64 * 55 * 55 * 4
    assert fp32.activation_bytes_per_image > 64 * 55 * 55 * 4
    # Half-width activations, but some saved tensors (max-pool indices, dropout masks) keep theirs.
    assert 0.5 <= bf16.activation_bytes_per_image / fp32.activation_bytes_per_image < 0.7


def test_the_default_reserve_is_alexnets_measured_reserve(alexnet_footprints):
    fp = alexnet_footprints[0]["bf16"]
    measured = training_reserve_bytes(fp, batch_size=128, eval_batch_size=512, image_size=227, precision="bf16")
    # Within 5%: CPU kernels may round saved storages differently across torch builds.
    assert measured == pytest.approx(DEFAULT_RESERVE_BYTES, rel=0.05)


def test_reserve_grows_with_optimizer_state_precision_and_ddp():
    fp = Footprint(params=1_000_000, activation_bytes_per_image=2_000_000, largest_activation_per_image=400_000)
    kw = dict(fp=fp, batch_size=128, eval_batch_size=512, image_size=227)
    sgd, adamw = training_reserve_bytes(**kw, optimizer="sgd"), training_reserve_bytes(**kw, optimizer="adamw")
    # AdamW keeps a second moment: 4 more bytes a parameter, times the slack.
    assert adamw - sgd == pytest.approx(4 * fp.params * SLACK, abs=2)
    ddp = training_reserve_bytes(**kw, ddp=True)
    assert ddp - sgd == pytest.approx(4 * fp.params * SLACK, abs=2)
    assert training_reserve_bytes(**kw, precision="fp32") < sgd  # same activations here, no half copies
    with pytest.raises(ValueError, match="precision"):
        training_reserve_bytes(**kw, precision="fp8")


# --- budget and residency ------------------------------------------------------------------

@pytest.mark.parametrize("k", [1, 2, 4])
def test_k_budgets_and_their_contexts_fill_the_gpu_exactly(k):
    total = 80 * GIB
    budget = memory_budget(total, 1 / k)
    assert budget == total // k - CUDA_CONTEXT_BYTES
    assert k * (budget + CUDA_CONTEXT_BYTES) <= total
    assert memory_budget(total, 2.0) == memory_budget(total, 1.0)  # a DDP worker holds one GPU


def test_residency_fills_train_first_then_validation_then_test():
    sizes = {"test": 1 * GIB, "train": 6 * GIB, "validation": 2 * GIB}
    reserve = 2 * GIB
    assert plan_residency(sizes, 20 * GIB, reserve) == {"train": True, "validation": True, "test": True}
    # Room for train and one more: validation comes before test.
    assert plan_residency(sizes, 10 * GIB, reserve) == {"train": True, "validation": True, "test": False}
    # Train does not fit, the others do: they still go on the device.
    assert plan_residency(sizes, 5 * GIB, reserve) == {"train": False, "validation": True, "test": True}
    assert plan_residency(sizes, reserve, reserve) == {"train": False, "validation": False, "test": False}


def test_a_streamed_split_still_costs_its_batches_in_flight():
    sizes, reserve = {"train": 6 * GIB, "validation": 2 * GIB}, 2 * GIB
    # Both fit in 10 GiB with nothing in flight...
    assert plan_residency(sizes, 10 * GIB, reserve) == {"train": True, "validation": True}
    # ...but with validation streaming, its batches would not fit beside train: train yields.
    in_flight = {"train": GIB // 2, "validation": 3 * GIB}
    assert plan_residency(sizes, 9 * GIB, reserve, in_flight) == {"train": False, "validation": True}


def test_a_12gb_card_holds_train_and_test_at_fraction_1_and_streams_validation():
    total = int(11.7 * GIB)  # an RTX 3060
    rows = trial_rows(LABELS, 1.0, 10_000, 5_000)
    plan = plan_residency(bytes_by_split(rows, 227), memory_budget(total, 1.0), DEFAULT_RESERVE_BYTES,
                          stream_bytes(128, 512, 227))
    assert plan == {"train": True, "validation": False, "test": True}


def test_without_a_process_group_ranks_keep_their_own_plan():
    from raysweep.trial.residency import agree_on_residency

    plan = {"train": True, "validation": False}
    assert agree_on_residency(plan) == plan


def _vote(rank: int, world: int, init: str, out: str) -> None:
    import torch.distributed as dist

    from raysweep.trial.residency import agree_on_residency

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        mine = {"train": rank == 0, "validation": True, "test": rank == 1}
        with open(f"{out}.{rank}", "w") as f:
            json.dump(agree_on_residency(mine), f)
    finally:
        dist.destroy_process_group()


def test_ddp_ranks_agree_on_the_split_that_fits_everywhere(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_vote, args=(2, f"file://{tmp_path / 'rendezvous'}", str(tmp_path / "plan")), nprocs=2)
    plans = [json.loads((tmp_path / f"plan.{r}").read_text()) for r in range(2)]
    assert plans[0] == plans[1] == {"train": False, "validation": True, "test": False}


# --- --gpus-per-trial auto -----------------------------------------------------------------

@pytest.mark.parametrize("card,share_1,share_16", [
    ("H200 141GB", 1.0, 0.25),
    ("A100 80GB", 1.0, 0.25),
    ("A100 40GB", 1.0, 0.25),
    ("RTX 4090 24GB", 1.0, 0.25),
    ("A10 24GB", 1.0, 0.5),  # 22.0 GiB: a quarter (4.75 GiB) is below 1/16's 5.0 GiB
])
def test_auto_gives_fraction_1_a_gpu_and_packs_a_sixteenth(card, share_1, share_16):
    shares = auto_gpu_shares(NEED, int(CARDS[card] * GIB))
    assert (shares[1.0], shares[0.0625]) == (share_1, share_16)
    assert shares[0.5] == 0.5  # half the data: half a GPU where it fits, on all of these


@pytest.mark.parametrize("card", list(CARDS))
def test_packed_trials_always_fit_their_budget_and_never_stream(card):
    total = int(CARDS[card] * GIB)
    shares = auto_gpu_shares(NEED, total)
    for f, share in shares.items():
        assert share in (1.0, 0.5, 0.25)
        assert share >= min(1.0, f)  # size: at most 1/k of the training set per 1/k of a GPU
        if share < 1:
            assert NEED[f] <= memory_budget(total, share)
            rows = trial_rows(LABELS, f, 10_000, 5_000)
            plan = plan_residency(bytes_by_split(rows, 227), memory_budget(total, share), DEFAULT_RESERVE_BYTES)
            assert all(plan.values())


def test_a_card_too_small_for_any_sharing_gives_every_trial_a_whole_gpu():
    assert set(auto_gpu_shares(NEED, int(8 * GIB)).values()) == {1.0}


def test_auto_on_a_4_gpu_a100_40gb_box_runs_up_to_16_trials_if_cpus_allow():
    plan = plan_resources(cluster_cpus=32, cluster_gpus=4, gpus_per_trial="auto", cpus_per_trial=1,
                          gpu_memory_bytes=int(CARDS["A100 40GB"] * GIB), trial_bytes=NEED)
    assert [plan.gpu_share(f) for f in FRACTIONS] == [1.0, 0.5, 0.25, 0.25, 0.25]
    assert plan.max_concurrent_trials == 16
    # The default sweep's 15 trials: 3 whole GPUs, 3 halves, 9 quarters = 6.75 GPUs of work at once,
    # which Ray places as GPUs free up.
    assert sum(plan.gpu_share(f) for f in FRACTIONS for _ in range(3)) == 6.75


# --- precision and the CUDA preflight ------------------------------------------------------

@pytest.mark.parametrize("cap,bf16,expect", [
    ((9, 0), True, "bf16"), ((8, 6), True, "bf16"), ((8, 0), True, "bf16"),
    ((7, 5), True, "fp16"), ((7, 0), True, "fp16"), ((6, 1), True, "fp32"), ((9, 0), False, "fp32"),
])
def test_precision_follows_compute_capability(cap, bf16, expect):
    assert choose_precision(cap, bf16) == expect


def _probe(node, ok=True, cap=(9, 0), precision="bf16", memory=80 * GIB, **extra):
    return {"node": node, "ok": ok, "capability": list(cap), "precision": precision, "total_memory": memory, **extra}


def test_the_weakest_node_sets_the_sweeps_precision_and_says_so():
    report = summarize_cuda_probes([_probe("10.0.0.1 (aaaa)"), _probe("10.0.0.2 (bbbb)", cap=(7, 5),
                                                                        precision="fp16", memory=15 * GIB)], bf16=True)
    assert report.precision == "fp16" and report.capability == (7, 5) and report.nodes == 2
    assert report.gpu_memory_bytes == 15 * GIB
    assert len(report.notes) == 1 and "10.0.0.2 (bbbb) has 7.5" in report.notes[0]
    assert "fp16 with a gradient scaler" in report.notes[0]
    same = summarize_cuda_probes([_probe("a"), _probe("b")], bf16=True)
    assert same.precision == "bf16" and same.notes == []


def test_a_failing_node_is_one_line_with_its_reason_and_fix():
    bad = _probe("10.0.0.7 (cccc)", ok=False, reason="no NVIDIA driver found", fix="install the NVIDIA driver")
    with pytest.raises(RaysweepError) as err:
        summarize_cuda_probes([_probe("10.0.0.1 (aaaa)"), bad, dict(bad, node="10.0.0.8 (dddd)")], bf16=True)
    msg = str(err.value)
    assert "\n" not in msg
    assert msg == ("CUDA preflight failed on node 10.0.0.7 (cccc): no NVIDIA driver found (and 1 more node(s)); "
                   "fix: install the NVIDIA driver")
    with pytest.raises(RaysweepError, match="no GPU node"):
        summarize_cuda_probes([], bf16=True)


@pytest.mark.skipif(not NO_GPU, reason="checks the answer of a machine without a GPU")
def test_the_probe_on_this_gpu_less_machine_names_the_reason_and_the_fix():
    import torch

    r = probe_cuda(True)
    assert r["ok"] is False and r["torch"] == torch.__version__
    if torch.version.cuda is None:
        assert "CPU-only build" in r["reason"]
    else:
        assert r["reason"] == "no NVIDIA driver found (torch.cuda.is_available() is False)"
        assert r["fix"].startswith("install the NVIDIA driver")


@pytest.mark.slow
def test_cuda_preflight_runs_on_each_node_through_ray(ray_session):
    """The session cluster's nodes have no GPU: the real probe, run pinned on each (asking for
    no GPU share, which they could not give), fails there, and the sweep would stop with one
    line naming a node and the driver's reason."""
    from raysweep.cluster.connect import node_label
    from raysweep.cluster.preflight import cuda_preflight

    nodes = trial_nodes(ray_session.nodes(), use_gpu=False)
    with pytest.raises(RaysweepError) as err:
        cuda_preflight(bf16=True, nodes=nodes, timeout_s=120, gpu_share=0)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("CUDA preflight failed on node ")
    assert any(msg.startswith(f"CUDA preflight failed on node {node_label(n)}: ") for n in nodes)
    assert ": no NVIDIA driver found" in msg or "CPU-only build" in msg
    assert "(and 1 more node(s)); fix: " in msg


# --- python -m raysweep.bench gpu ----------------------------------------------------------

@pytest.mark.skipif(not NO_GPU, reason="checks the refusal of a machine without a GPU")
def test_bench_gpu_without_cuda_exits_2_with_one_line():
    proc = run_cli("raysweep.bench.gpu", check=False, timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("raysweep: error: bench gpu: no CUDA device is available")


def test_bench_gpu_help_shows_defaults():
    proc = run_cli("raysweep.bench.gpu", "--help", timeout=60)
    assert "(default: 128)" in proc.stdout and "(default: 420.0)" in proc.stdout


def test_epoch_overheads_count_epochs_without_a_checkpoint_once(tmp_path):
    from raysweep.bench.gpu import epoch_overheads

    rows = [{"epoch": 1, "time_epoch_s": 10.0, "time_train_s": 7.0, "time_eval_s": 2.0, "time_report_s": 0.2},
            {"epoch": 2, "time_epoch_s": 9.5, "time_train_s": 7.0, "time_eval_s": 2.0, "time_report_s": 0.4},
            {"epoch": 2, "time_epoch_s": 99.0, "time_train_s": 7.0, "time_eval_s": 2.0},  # a replayed epoch
            {"epoch": 3, "time_epoch_s": 12.0, "time_train_s": 7.0, "time_eval_s": 2.0, "checkpointed": True,
             "time_checkpoint_s": 2.5}]
    for trial in ("t1", "t2"):
        (tmp_path / trial).mkdir()
        (tmp_path / trial / "result.json").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    got = epoch_overheads(tmp_path)
    assert (got["epochs"], got["epochs_measured"]) == (6, 4)
    # Overheads 1.0 and 0.5 s in each trial; sums of short decimals: 1e-9 is plenty.
    assert got["overhead_s_median"] == pytest.approx(0.75, abs=1e-9)
    assert got["overhead_s_max"] == pytest.approx(1.0, abs=1e-9)
    assert got["checkpoint_s_median"] == pytest.approx(2.5, abs=1e-9)
    assert got["report_s_median"] == pytest.approx(0.3, abs=1e-9)
    assert epoch_overheads(tmp_path / "t_missing")["epochs"] == 0


@pytest.mark.slow
def test_bench_gpu_cpu_smoke_runs_every_stage_and_ends_with_json():
    proc = run_cli("raysweep.bench.gpu", "--cpu-smoke", timeout=600)
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["skipped"] == [] and out["speed"] and "error" not in out["speed"][0]
    assert out["speed"][0]["loop_img_s"] > 0 and out["speed"][0]["model_img_s"] > 0
    assert out["memory"]["on_device"] == {"train": True, "validation": True, "test": True}
    for k in ("1", "2"):
        assert out["packing"][k]["oom"] is False and out["packing"][k]["errors"] == []
        assert len(out["packing"][k]["per_trial_img_s"]) == int(k)


# --- on a real GPU (skipped without one) ---------------------------------------------------

@needs_gpu("for the preflight's convolution")
@pytest.mark.parametrize("bf16", [True, False])
def test_probe_on_this_gpu_trains_a_convolution(bf16):
    import torch

    r = probe_cuda(bf16)
    assert r["ok"], r
    cap = tuple(r["capability"])
    assert r["precision"] == choose_precision(cap, bf16) and r["total_memory"] > 0
    assert cap == torch.cuda.get_device_capability(0) or r["gpus"] > 1


@needs_gpu("to enforce a memory fraction")
def test_the_memory_budget_is_enforced_by_the_allocator():
    # In a child: the fraction stays with the process that set it.
    code = ("import torch\nfrom raysweep.cluster.gpu import apply_memory_budget\n"
            "dev = torch.device('cuda', 0)\nb = apply_memory_budget(dev, 0.25)\n"
            "x = torch.empty(int(b * 0.8), dtype=torch.uint8, device=dev)\n"
            "try:\n    y = torch.empty(int(b * 0.4), dtype=torch.uint8, device=dev)\n    print('no-oom')\n"
            "except torch.OutOfMemoryError:\n    print('oom')\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "oom", out.stderr


@needs_gpu("to pack trials on")
def test_four_packed_trials_run_under_their_budgets_without_oom():
    import argparse

    import torch

    from raysweep.bench.gpu import MINI_IMAGENET, _pack, _reserve

    args = argparse.Namespace(image_size=227, classes=100, width=1.0, rows=dict(MINI_IMAGENET), batch_size=128,
                              eval_batch_size=512, warmup=5, pack_fraction=0.0625, pack_seconds=5.0)
    out = _pack(args, torch.device("cuda", 0), _reserve(args), 4)
    assert out["oom"] is False and out["errors"] == [], out
    assert out["within_budget"] and len(out["per_trial_img_s"]) == 4


@needs_gpu("for a real trial")
@pytest.mark.slow
def test_a_real_cuda_trial_runs_the_smoke_sweep(tmp_path):
    proc = run_cli("raysweep.tune", "--config", "configs/smoke.yaml", "--gpus-per-trial", "1",
                   "--storage-path", str(tmp_path), "--name", "gpu", "--quiet",
                   "--set", f"data.cache_dir={tmp_path / 'cache'}", timeout=900)
    rows = json.loads((tmp_path / "gpu" / "summary.json").read_text())
    assert rows and all(r["status"] == "TERMINATED" for r in rows), proc.stdout[-2000:]
