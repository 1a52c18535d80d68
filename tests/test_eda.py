"""python -m analysis.eda on every layout a sweep accepts (no Ray): counts, carving, one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pandas as pd
import pytest

from analysis.eda import main
from raysweep.data.synthetic import write_synthetic

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args):
    return subprocess.run([sys.executable, "-m", "analysis.eda", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("folder,image_column,val", [("data", "image", True), ("plain_text", "img", False),
                                                      ("", "image", True)])
def test_eda_reads_every_hub_layout(tmp_path, capsys, folder, image_column, val):
    root = write_synthetic(tmp_path / "set", classes=3, train_per_class=10, val_per_class=2 if val else 0,
                           test_per_class=2, folder=folder, image_column=image_column, size=(24, 16))
    assert main(["--data", str(root), "--out", str(tmp_path / "eda"), "--set", "data.image_size=64"]) == 0
    out = capsys.readouterr().out
    counts = pd.read_csv(tmp_path / "eda" / "class_counts.csv")
    assert counts["test"].tolist() == [2, 2, 2]
    if val:
        assert counts["train"].tolist() == [10, 10, 10] and counts["validation"].tolist() == [2, 2, 2]
        assert "carve" not in out
    else:  # what a sweep will carve (10% of 10 = 1 per class) and what train keeps
        assert counts["train"].tolist() == [9, 9, 9] and counts["validation"].tolist() == [1, 1, 1]
        assert "validation: none in the source; a sweep carves 3 rows from train (0.1 of each class" in out
    assert f"columns: image '{image_column}', label 'label'" in out
    assert "24 x 16" in out and "100.0% below 64 (data.image_size, from --set)" in out
    assert (tmp_path / "eda" / "image_sizes.png").stat().st_size > 0


def test_eda_on_the_builtin_set_reports_the_split_a_sweep_will_carve(tmp_path, capsys):
    assert main(["--data", "builtin:cifar10-sample", "--out", str(tmp_path), "--set", "data.val_fraction=0.2"]) == 0
    out = capsys.readouterr().out
    counts = pd.read_csv(tmp_path / "class_counts.csv")
    assert counts["class_name"].tolist()[:3] == ["airplane", "automobile", "bird"]
    assert set(counts["train"]) == {160} and set(counts["validation"]) == {40} and set(counts["test"]) == {200}
    assert "a sweep carves 400 rows from train (0.2 of each class" in out
    assert "config: plain_text; columns: image 'img', label 'label'; splits on disk: train, test" in out


def test_eda_says_which_image_size_it_measures_against(tmp_path, capsys):
    """Without --config the size is the default config's 227 px, not the data's: the line says so."""
    assert main(["--data", "builtin:cifar10-sample", "--out", str(tmp_path)]) == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("shorter side"))
    assert line == ("shorter side: median 32, 100.0% below 227 (data.image_size of configs/default.yaml, the "
                    "default: pass the sweep's --config, or --set data.image_size=N, to measure against its size)")
    demo = os.path.join(REPO, "configs", "demo.yaml")
    assert main(["--config", demo, "--out", str(tmp_path)]) == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("shorter side"))
    assert line == f"shorter side: median 32, 100.0% below 64 (data.image_size of {demo})"


def test_eda_reports_a_layout_problem_in_one_line(tmp_path):
    write_synthetic(tmp_path / "set", classes=2, train_per_class=2, val_per_class=0, test_per_class=1,
                    folder="a", size=(8, 8))
    write_synthetic(tmp_path / "set", classes=2, train_per_class=2, val_per_class=0, test_per_class=1,
                    folder="b", size=(8, 8))
    run = _run("--data", str(tmp_path / "set"), "--out", str(tmp_path / "eda"))
    assert run.returncode == 2 and "Traceback" not in run.stderr
    (line,) = run.stderr.strip().splitlines()
    assert line.startswith("raysweep: error: data source") and "Configs seen: a/ (train, test), b/ (train, test)" in line
    assert _run("--data", str(tmp_path / "set"), "--out", str(tmp_path / "eda"), "--set", "data.config=b").returncode == 0


@pytest.mark.parametrize("module", ["analysis.eda", "raysweep.prepare"])
def test_help_shows_defaults_and_is_fast(module):
    t0 = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO, capture_output=True, text=True,
                         timeout=60, env={**os.environ, "COLUMNS": "250"})
    seconds = time.perf_counter() - t0
    text = " ".join(run.stdout.split())
    assert run.returncode == 0 and "(default: data.source of the config, timm/mini-imagenet)" in text
    # 2 s is the project's bar for --help; it imports no ray, torch or pandas to meet it.
    assert seconds < 2.0, f"{module} --help took {seconds:.1f} s"
