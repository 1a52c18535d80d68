"""The GPU kit's pure parts: what it ships for the node, and the figures its stages report."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "gpu_kit"))

import accept  # noqa: E402
import build  # noqa: E402


def _item(version: str, *requires: str) -> dict:
    return {"metadata": {"version": version, "requires_dist": list(requires)}}


def test_missing_closure_stops_at_what_the_node_has_and_follows_extras_and_markers():
    resolved = {
        "ray": _item("2.60.0", "jsonschema", "numpy>=1.20; extra == \"data\"", "pydantic<3; extra == \"tune\"",
                     "py-spy>=0.4; python_version >= \"3.12\" and extra == \"default\"",
                     "old-thing; python_version < \"3.12\""),
        "jsonschema": _item("4.26.0", "attrs>=22", "rpds-py"),
        "attrs": _item("26.1.0"), "rpds-py": _item("2026.9.1"),
        "pydantic": _item("2.14.4", "numpy"), "py-spy": _item("0.4.3"), "old-thing": _item("1.0"),
        "numpy": _item("2.4.6"),
    }
    need = build.missing_closure(["ray[default,tune]>=2.60"], resolved, installed={"numpy"}, python_version="3.12")
    assert need == {"ray": "2.60.0", "jsonschema": "4.26.0", "attrs": "26.1.0", "rpds-py": "2026.9.1",
                    "pydantic": "2.14.4", "py-spy": "0.4.3"}
    # On 3.11 the 3.12-only requirement drops out and the <3.12 one comes in.
    older = build.missing_closure(["ray[default,tune]>=2.60"], resolved, installed={"numpy"}, python_version="3.11")
    assert "py-spy" not in older and older["old-thing"] == "1.0"


def test_the_node_list_names_torch_and_none_of_what_the_node_lacks():
    names = build.target_installed(REPO / "gpu_kit" / "target-installed.txt")
    assert {"torch", "torchvision", "numpy", "huggingface-hub", "pyyaml"} <= names
    assert not names & {"ray", "datasets", "tensorboardx", "crc32c", "jsonschema", "pydantic", "mlflow"}


def _epoch(epoch: int, **kw) -> dict:
    row = {"epoch": epoch, "config": {"fraction": 0.25, "seed": 0}, "n_train": 12_500, "images_per_sec": 9000.0,
           "time_train_s": 1.4, "time_eval_s": 0.5, "time_checkpoint_s": 0.0, "checkpointed": False}
    return row | kw


def test_trial_figures_overhead_leaves_out_train_eval_checkpoint_and_the_first_epoch():
    rows = [_epoch(1, time_epoch_s=30.0, time_to_first_step_s=12.0, time_data_load_s=2.0),
            _epoch(2, time_epoch_s=2.0),
            _epoch(3, time_epoch_s=2.5, time_checkpoint_s=0.3, checkpointed=True, time_test_s=0.2,
                   gpu_peak_bytes=6 << 30, gpu_estimate_bytes=8 << 30)]
    t = accept.trial_figures(rows)
    # Overheads 2.0-1.9 and 2.5-1.9-0.3; float sums carry rounding, hence approx.
    assert t["overhead_s_median"] == pytest.approx(0.2, abs=1e-3) and t["overhead_s_max"] == pytest.approx(0.3, abs=1e-3)
    assert t["fraction"] == 0.25 and t["time_to_first_step_s"] == 12.0 and t["checkpoints"] == 1
    assert t["time_checkpoint_s"] == [0.3] and t["gpu_peak_over_estimate"] == 0.75


def test_projection_scales_training_with_n_and_counts_every_trial(tmp_path):
    trials = []
    for f, n, first in ((1.0, 50_000, 20.0), (0.0625, 3_125, 8.0)):
        trials.append({"fraction": f, "n_train": n, "epochs": 3, "time_train_s": n / 20_000, "time_eval_s": 0.2,
                       "overhead_s_median": 0.01, "time_checkpoint_s": [0.3], "time_to_first_step_s": first,
                       "time_test_s": 0.1})
    (tmp_path / "sweep.json").write_text(json.dumps({"figures": {"trials": trials}}))
    readme = tmp_path / "README.md"
    readme.write_text("so about 67 minutes one trial at a time; ... about 29 minutes one trial at a time")
    out = accept.project(tmp_path, REPO / "configs" / "default.yaml", readme)
    assert out["trials"] == 15 and out["epochs"] == 90 and out["readme_paper_estimate_min"] == 29
    by_f = {r["fraction"]: r for r in out["per_fraction"]}
    # Fraction 1: 2.5 s training + 0.2 eval + 0.01 overhead + 0.1 checkpoint (0.3 over 3 epochs).
    assert by_f[1.0]["epoch_s"] == pytest.approx(2.81, abs=0.01)
    assert by_f[1.0]["trial_s"] == pytest.approx(20.0 + 90 * 2.81 + 0.1, abs=1.0)
    assert out["serial_s"] == pytest.approx(3 * sum(r["trial_s"] for r in out["per_fraction"]), rel=1e-3)
