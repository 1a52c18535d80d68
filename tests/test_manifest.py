"""raysweep.sweep.manifest: every field the issue lists, atomic writes, resume keeps the first start,
outside a git checkout, GPUs read from nvidia-smi, and cheap enough to call at every start."""

from __future__ import annotations

import json
import os
import platform
import stat
import subprocess
from importlib import metadata
from pathlib import Path

import pytest

from raysweep.console import python_command
from raysweep.sweep import manifest as M

PY = python_command()  # the interpreter, as printed commands name it
from raysweep.errors import RaysweepError

REPO = Path(__file__).resolve().parent.parent
CFG = {"name": "demo", "train": {"lr": 3e-4, "epochs": 30}, "sweep": {"fractions": [1.0, 0.5], "seeds": [0, 1]}}
DATA = {"source": "synthetic", "fingerprint": "f00d", "cache_key": "k123", "cache_path": "/cache/k123",
        "counts": {"train": 800, "validation": 200, "test": 200}, "num_classes": 10, "carved_validation": None}
MODEL = {"name": "alexnet", "width": 0.25, "num_params": 2_470_000, "image_size": 64}
RES = {"cpus": 2, "gpus": 0, "plan": "2 trials at a time, 1 CPU each"}


def _start(exp_dir: Path, argv=("--config", "configs/demo.yaml")) -> dict:
    return M.start(exp_dir, argv=list(argv), cfg_dict=CFG, data_info=DATA, model_info=MODEL, resources=RES)


def test_start_and_finish_record_every_field(tmp_path):
    exp = tmp_path / "demo-1"
    _start(exp)
    done = M.finish(exp, status="finished", trials={"TERMINATED": 4})
    on_disk = json.loads((exp / "manifest.json").read_text())
    assert on_disk == done
    assert on_disk["command"] == f"{PY} -m raysweep.tune --config configs/demo.yaml"
    assert on_disk["config"] == CFG and on_disk["config_hash"] == M.config_hash(CFG)
    assert on_disk["data"] == DATA and on_disk["model"] == MODEL and on_disk["resources"] == RES
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:  # this checkout is a git repository (a CI clone is)
        assert on_disk["git"]["commit"] == head.stdout.strip() and isinstance(on_disk["git"]["dirty"], bool)
    env = on_disk["environment"]
    for name in ("ray", "torch", "torchvision", "numpy", "pyarrow"):
        assert env["versions"][name] == metadata.version(name)
    assert env["versions"]["python"] == platform.python_version()
    assert env["os"] == platform.platform() and env["cpu_count"] == os.cpu_count() and env["cpu_model"]
    assert isinstance(env["gpus"], list)
    assert on_disk["status"] == "finished" and on_disk["trials"] == {"TERMINATED": 4}
    assert on_disk["started_at"] <= on_disk["ended_at"] and on_disk["wall_time_s"] >= 0


def test_the_config_hash_follows_the_config_not_its_key_order():
    assert M.config_hash({"a": 1, "b": {"c": 2}}) == M.config_hash({"b": {"c": 2}, "a": 1})
    assert M.config_hash({"a": 1}) != M.config_hash({"a": 2})


def test_a_resumed_sweep_keeps_its_first_start(tmp_path, monkeypatch):
    exp = tmp_path / "demo-1"
    clock = iter(["2026-01-01T00:00:00+00:00", "2026-01-01T00:10:00+00:00",
                  "2026-01-02T00:00:00+00:00", "2026-01-02T00:20:00+00:00"])
    monkeypatch.setattr(M, "_now", lambda: next(clock))
    _start(exp)
    M.finish(exp, status="interrupted", trials={"TERMINATED": 1, "UNFINISHED": 3})
    _start(exp, argv=("--resume", "--name", "demo-1"))
    resumed = M.finish(exp, status="finished", trials={"TERMINATED": 4})
    assert resumed["started_at"] == "2026-01-01T00:00:00+00:00"
    assert resumed["ended_at"] == "2026-01-02T00:20:00+00:00"
    assert resumed["command"] == f"{PY} -m raysweep.tune --config configs/demo.yaml"  # the original
    assert [a["status"] for a in resumed["attempts"]] == ["interrupted", "finished"]
    assert resumed["attempts"][1]["command"] == f"{PY} -m raysweep.tune --resume --name demo-1"
    assert resumed["wall_time_s"] == pytest.approx(sum(a["wall_time_s"] for a in resumed["attempts"]))


def test_writes_are_atomic(tmp_path, monkeypatch):
    exp = tmp_path / "demo-1"
    first = _start(exp)

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr("raysweep.io.os.replace", fail)
    with pytest.raises(OSError, match="disk full"):
        M.finish(exp, status="finished", trials={})
    # The reader still sees the whole previous manifest, and no temporary file is left behind.
    assert json.loads((exp / "manifest.json").read_text()) == first
    assert [p.name for p in exp.iterdir()] == ["manifest.json"]


def test_outside_a_git_checkout(tmp_path, monkeypatch):
    monkeypatch.setattr(M, "PROJECT_ROOT", tmp_path)  # code run from a copied tree or an installed wheel
    state = _start(tmp_path / "exp")["git"]
    assert state["commit"] is None and state["dirty"] is None and "is not a git checkout" in state["reason"]
    monkeypatch.setattr(M.shutil, "which", lambda name: None)
    assert M.git_state()["reason"] == "git is not installed"


def test_gpus_come_from_nvidia_smi(tmp_path, monkeypatch):
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\n"
                    'if [ "$1" = "--query-gpu=index,name,memory.total,driver_version" ]; then\n'
                    '  echo "0, NVIDIA H200, 143771, 570.124.06"; echo "1, NVIDIA H200, 143771, 570.124.06"\n'
                    "else\n"
                    '  echo "| NVIDIA-SMI 570.124.06   Driver Version: 570.124.06   CUDA Version: 12.8 |"\n'
                    "fi\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    found, why = M.gpus()
    assert why is None
    assert found == [{"index": i, "name": "NVIDIA H200", "memory_mib": 143771, "driver": "570.124.06", "cuda": "12.8"}
                     for i in (0, 1)]
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))
    assert M.gpus() == ([], "nvidia-smi not found")


def test_finish_without_start_and_a_corrupt_manifest_are_named(tmp_path):
    with pytest.raises(RaysweepError, match="no manifest to finish"):
        M.finish(tmp_path, status="finished", trials={})
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(RaysweepError, match=f"cannot read {tmp_path / 'manifest.json'}"):
        _start(tmp_path)


def test_start_is_cheap(tmp_path):
    # CPU seconds of this process and its children (git): wall time here depends on the other
    # agents sharing the machine, CPU time does not.
    before = os.times()
    _start(tmp_path / "exp")
    after = os.times()
    used = sum(after[i] - before[i] for i in range(4))
    assert used < 0.5, f"manifest.start used {used:.2f} CPU seconds"
