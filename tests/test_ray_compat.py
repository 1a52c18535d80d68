"""raysweep.sweep.ray_compat names everything it needs of Ray beyond the public API. These
tests fail `make test` when an upgrade of Ray moves any of it, instead of the sweep
misbehaving silently; and they show that RAYSWEEP_STOCK_RAY=1 turns every item off."""

from __future__ import annotations

import importlib
import inspect
import os
import re
from pathlib import Path

import pytest

from raysweep.sweep import ray_compat

REPO = Path(__file__).resolve().parent.parent


def _resolve(dotted: str):
    module, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _has_attribute(cls, attr: str) -> bool:
    """On the class, or assigned as `self.<attr>` in its source (instance attributes)."""
    if hasattr(cls, attr):
        return True
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return False
    return re.search(rf"self\.{re.escape(attr)}\s*[:=]", source) is not None


def missing_private_names() -> list[str]:
    """Every listed module, symbol and run-time attribute that this Ray lacks."""
    missing = []
    for module, symbols in ray_compat.PRIVATE_SYMBOLS.items():
        try:
            mod = importlib.import_module(module)
        except ImportError:
            missing.append(module)
            continue
        missing += [f"{module}.{s}" for s in symbols if not hasattr(mod, s)]
    for dotted, attrs in ray_compat.RUNTIME_ATTRIBUTES.items():
        try:
            cls = _resolve(dotted)
        except (ImportError, AttributeError):
            missing.append(dotted)
            continue
        missing += [f"{dotted}.{a}" for a in attrs if not _has_attribute(cls, a)]
    return missing


def missing_env_names() -> list[str]:
    """The Ray settings in ENV_DEFAULTS whose names no longer appear anywhere in Ray's source
    (Python, or the names the raylet's config table exports to its Python bindings)."""
    import ray

    root = Path(ray.__file__).parent
    wanted = {i.name for i in ray_compat.ENV_DEFAULTS if i.read_by_ray}
    found = set()
    for path in root.rglob("*.py"):
        text = path.read_text(errors="ignore")
        found |= {n for n in wanted - found if n in text or n.removeprefix("RAY_") in text}
        if found == wanted:
            break
    if wanted - found:  # RayConfig entries live in the compiled raylet: look in the binary too
        for path in list(root.glob("_raylet*.so")) + list(root.rglob("raylet")):
            if path.is_file():
                data = path.read_bytes()
                found |= {n for n in wanted - found if n.removeprefix("RAY_").encode() in data}
    return sorted(wanted - found)


def test_every_private_name_the_module_uses_exists_in_this_ray():
    assert missing_private_names() == []


def test_every_ray_setting_the_module_sets_exists_in_this_ray():
    assert missing_env_names() == []


def test_trains_checkpoint_layout_is_the_one_in_place_checkpoints_write_to(tmp_path):
    """The loop writes a checkpoint to <storage_path>/<run name>/<name> and registers it with
    NO_UPLOAD (raysweep.trial.loop): that must be where Train itself keeps it."""
    from ray.train.v2._internal.execution.storage import StorageContext

    storage = StorageContext(str(tmp_path), "trial_abc")
    assert Path(storage.build_checkpoint_path_from_name("checkpoint_epoch_0001")) == \
        tmp_path / "trial_abc" / "checkpoint_epoch_0001"


def test_the_check_fails_when_ray_moves_a_name(monkeypatch):
    """The checks are not vacuous: remove one listed name from Ray and they report it."""
    import ray._private.worker as ray_worker
    import ray.tune.experiment.trial as trial_mod

    monkeypatch.delattr(ray_worker, "_global_node")
    monkeypatch.delattr(trial_mod.Trial, "init_local_path")
    assert set(missing_private_names()) >= {"ray._private.worker._global_node",
                                             "ray.tune.experiment.trial.Trial.init_local_path"}
    monkeypatch.setattr(ray_compat, "ENV_DEFAULTS", (*ray_compat.ENV_DEFAULTS, ray_compat.EnvDefault(
        "RAY_no_such_setting_anywhere", "1", "driver", "a test", "none")))
    assert missing_env_names() == ["RAY_no_such_setting_anywhere"]


def test_private_names_appear_only_in_the_compat_module():
    """The layout's promise: Ray's internals are named in one module (its table lists them)."""
    pattern = re.compile(r"_internal|_private|_local_tuner|init_local_path")
    hits = [f"{p.relative_to(REPO)}:{i}" for folder in ("raysweep", "analysis")
            for p in sorted((REPO / folder).rglob("*.py")) if p.name != "ray_compat.py"
            for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert hits == []


def test_a_ray_version_other_than_the_tested_one_gets_one_warning_line(monkeypatch, capsys):
    import ray

    monkeypatch.setattr(ray, "__version__", ray_compat.TESTED_RAY)
    assert ray_compat.check_version() is None
    monkeypatch.setattr(ray, "__version__", "9.9.9")
    line = ray_compat.check_version()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "9.9.9" in line and ray_compat.TESTED_RAY in line and "RAYSWEEP_STOCK_RAY" in line


def test_stock_mode_turns_every_item_off(monkeypatch):
    monkeypatch.setenv(ray_compat.STOCK_ENV, "1")
    for item in ray_compat.ENV_DEFAULTS:
        monkeypatch.delenv(item.name, raising=False)
    assert ray_compat.apply_env_defaults("driver") == {}
    assert ray_compat.worker_env(use_gpu=False) == {}
    assert ray_compat.in_place_checkpoints("/tmp/x") is False
    assert ray_compat.local_ray_exited() is False

    class Tuner:  # replace_restored_callbacks must not touch a private attribute when stock
        pass

    ray_compat.replace_restored_callbacks(Tuner(), [])
    monkeypatch.setenv(ray_compat.STOCK_ENV, "0")
    applied = ray_compat.apply_env_defaults("driver", console=False)
    assert "TUNE_GLOBAL_CHECKPOINT_S" in applied and "TUNE_PRINT_ALL_TRIAL_ERRORS" not in applied
    assert ray_compat.worker_env(use_gpu=False) == {"MALLOC_ARENA_MAX": "1"}
    assert ray_compat.worker_env(use_gpu=True) == {}


def test_local_only_defaults_stay_off_a_joined_cluster(monkeypatch):
    monkeypatch.delenv(ray_compat.STOCK_ENV, raising=False)
    for item in ray_compat.ENV_DEFAULTS:
        monkeypatch.delenv(item.name, raising=False)
    joined = ray_compat.apply_env_defaults("driver", local=False)
    assert "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER" not in joined and "TUNE_GLOBAL_CHECKPOINT_S" in joined
    assert "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER" not in os.environ
    local = ray_compat.apply_env_defaults("driver", local=True)
    assert local == {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "RAY_worker_maximum_startup_concurrency":
                     os.environ["RAY_worker_maximum_startup_concurrency"]}


@pytest.mark.slow
def test_the_smoke_sweep_passes_on_stock_ray(ray_cluster, tmp_path):
    """RAYSWEEP_STOCK_RAY=1: every trial TERMINATED, every epoch reported, test errors present."""
    import json
    import os
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "raysweep.tune", "--config", "configs/smoke.yaml", "--address", ray_cluster,
         "--storage-path", str(tmp_path), "--name", "stock", "--fractions", "1", "--seeds", "0",
         "--set", f"data.cache_dir={tmp_path / 'cache'}"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
        env={**os.environ, ray_compat.STOCK_ENV: "1", "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads((tmp_path / "stock" / "summary.json").read_text())
    rows = rows["trials"] if isinstance(rows, dict) else rows
    assert [r["status"] for r in rows] == ["TERMINATED"]
    assert rows[0]["epochs_done"] == 2 and 0 <= rows[0]["test_top1_error"] <= 1
