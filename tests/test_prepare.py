"""prepare(): every image mode decoded to uint8 once, cached atomically, bad input named; validation carved."""

from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from raysweep.data import PreparedData, pil_square, prepare, prepare_from_config, resolve_source, stratified_subset
from raysweep.data.prepare import cache_path
from raysweep.errors import RaysweepError

SPLITS = ("train", "validation", "test")
BAD_ROW = 7


def split_file(root: Path, split: str) -> Path:
    return root / "data" / f"{split}-00000-of-00001.parquet"


def source_table(root: Path, split: str) -> pa.Table:
    return pq.read_table(split_file(root, split))


def copy_with(src: Path, dst: Path, split: str, edit) -> Path:
    """Copy a hub-layout dir, rewriting one split's table with `edit(table) -> table` (schema kept)."""
    shutil.copytree(src, dst)
    table = source_table(src, split)
    pq.write_table(edit(table).replace_schema_metadata(table.schema.metadata), split_file(dst, split),
                   row_group_size=100)
    return dst


def truncate_row(table: pa.Table, row: int) -> pa.Table:
    images = table.column("image").to_pylist()
    images[row] = {"bytes": images[row]["bytes"][: len(images[row]["bytes"]) // 2], "path": images[row]["path"]}
    return table.set_column(0, "image", pa.array(images, table.schema.field("image").type))


@pytest.fixture(scope="module")
def prepared(ray_session, synthetic_dir, tmp_path_factory) -> PreparedData:
    return prepare(str(synthetic_dir), tmp_path_factory.mktemp("cache"), progress=False)


@pytest.fixture(scope="module")
def corrupt_dir(synthetic_dir, tmp_path_factory) -> Path:
    return copy_with(synthetic_dir, tmp_path_factory.mktemp("corrupt") / "set", "train",
                     lambda t: truncate_row(t, BAD_ROW))


def test_every_mode_becomes_227x227_rgb_matching_pil(prepared, synthetic_dir):
    modes = set()
    for split in SPLITS:
        table = source_table(synthetic_dir, split)
        images = prepared.images(split)
        assert images.shape == (table.num_rows, 227, 227, 3) and images.dtype == np.uint8
        for i, row in enumerate(table.column("image").to_pylist()):
            with Image.open(io.BytesIO(row["bytes"])) as im:
                modes.add((im.format, im.mode))
            ref = pil_square(row["bytes"], 227)
            diff = np.abs(ref.astype(np.int16) - images[i].astype(np.int16)).max()
            assert diff <= 1, f"{split} row {i} ({row['path']}) differs from PIL by {diff}"
    assert {("JPEG", "L"), ("JPEG", "CMYK"), ("PNG", "RGB"), ("PNG", "P"), ("PNG", "RGBA")} <= modes


def test_labels_counts_and_class_names_follow_the_source(prepared, synthetic_dir):
    names = resolve_source(str(synthetic_dir)).class_names
    assert prepared.class_names == names and prepared.num_classes == 4
    assert prepared.counts == {"train": 48, "validation": 16, "test": 16}
    for split in SPLITS:
        want = source_table(synthetic_dir, split).column("label").to_numpy()
        assert prepared.labels(split).dtype == np.int64
        assert np.array_equal(prepared.labels(split), want)
        assert np.array_equal(prepared.source_rows(split), np.arange(len(want)))
    assert prepared.meta["skipped"] == 0 and prepared.decoded == 80


def _collect(ds):
    batches = list(ds.iter_batches(batch_size=None, batch_format="numpy"))
    return np.concatenate([b["image"] for b in batches]), np.concatenate([b["label"] for b in batches])


def test_dataset_is_in_source_row_order(prepared):
    ds = prepared.dataset("validation", block_rows=5)
    images, labels = _collect(ds)
    assert images.shape == (16, 227, 227, 3) and images.dtype == np.uint8 and labels.dtype == np.int64
    assert np.array_equal(labels, prepared.labels("validation"))
    assert np.array_equal(images, prepared.images("validation"))


def test_dataset_reads_only_the_subset_rows(prepared):
    idx = stratified_subset(prepared.labels("train"), 0.25, seed=1)
    images, labels = _collect(prepared.dataset("train", idx, block_rows=4))
    assert len(idx) == 12 and np.array_equal(labels, prepared.labels("train")[idx])
    assert np.array_equal(images, prepared.images("train")[idx])
    with pytest.raises(RaysweepError, match=r"\[0, 48\)"):
        prepared.dataset("train", [0, 48])
    with pytest.raises(RaysweepError, match="unknown split 'val'"):
        prepared.dataset("val")


def test_several_splits_load_in_one_execution_each_in_order(prepared):
    import ray
    import torch

    from raysweep.trial.device_data import load_splits

    idx = stratified_subset(prepared.labels("train"), 0.5, seed=2)
    ds = prepared.datasets({"train": idx, "validation": None, "test": None}, block_rows=5, read_node=True)
    rows = {"train": len(idx), "validation": len(prepared.labels("validation")), "test": len(prepared.labels("test"))}
    splits = load_splits(ds, rows, torch.device("cpu"), chunk=7)  # batches that straddle splits
    want = {"train": idx, "validation": slice(None), "test": slice(None)}
    for name, split in splits.items():
        assert len(split) == rows[name]
        assert np.array_equal(split.labels.numpy(), prepared.labels(name)[want[name]])
        assert np.array_equal(split.images.numpy(), prepared.images(name)[want[name]])
        assert split.read_nodes == {ray.get_runtime_context().get_node_id()}


def test_readers_grow_with_the_bytes_read_up_to_the_concurrency():
    from raysweep.data.cache import READER_BYTES, _readers

    demo = 2000 * 3 * 64 * 64  # the demo's three splits at 64 px: one process reads them
    assert _readers(demo, units=8, concurrency=2) == 1
    full = 50_000 * 3 * 227 * 227  # a whole mini-ImageNet train split at 227 px
    assert _readers(full, units=196, concurrency=2) == 2
    assert _readers(full, units=196, concurrency=8) == 8
    assert _readers(3 * READER_BYTES, units=2, concurrency=8) == 2  # never more tasks than blocks
    assert _readers(READER_BYTES + 1, units=10, concurrency=8) == 2


def test_second_run_reuses_the_cache_and_decodes_nothing(prepared, synthetic_dir):
    again = prepare(str(synthetic_dir), prepared.path.parent.parent, progress=False)
    assert again.decoded == 0 and again.path == prepared.path and again.meta == prepared.meta
    cfg_run = prepare_from_config(_data_cfg(synthetic_dir, prepared.path.parent.parent), progress=False)
    assert cfg_run.decoded == 0 and cfg_run.path == prepared.path


def test_a_relative_cache_dir_is_reused_from_another_working_directory(prepared, synthetic_dir, monkeypatch):
    # Trials run with Tune's trial dir as their working directory: the cache path must be absolute.
    cache_dir = prepared.path.parent.parent
    monkeypatch.chdir(cache_dir.parent)
    again = prepare(str(synthetic_dir), os.path.relpath(cache_dir), progress=False)
    assert again.decoded == 0 and again.path.is_absolute() and again.path == prepared.path
    monkeypatch.chdir("/")
    assert again.labels("train").tolist() == prepared.labels("train").tolist()


def _data_cfg(source, cache_dir):
    from raysweep.config import DataConfig

    return DataConfig(source=str(source), cache_dir=str(cache_dir))


def test_corrupt_image_fails_naming_split_row_and_path(ray_session, corrupt_dir, tmp_path):
    path = source_table(corrupt_dir, "train").column("image")[BAD_ROW].as_py()["path"]
    with pytest.raises(RaysweepError) as err:
        prepare(str(corrupt_dir), tmp_path, progress=False)
    msg = str(err.value)
    assert f"split 'train' row {BAD_ROW}" in msg and path in msg and "\n" not in msg
    # Nothing half-written survives to be trusted later.
    assert list((tmp_path / "prepared").iterdir()) == []


def test_skip_mode_counts_and_records_the_bad_image(ray_session, corrupt_dir, tmp_path):
    src = resolve_source(str(corrupt_dir))
    stale = cache_path(tmp_path, src, 227, "torchvision")
    stale = stale.with_name(f".tmp-{stale.name}-{socket.gethostname()}-999999999")
    stale.mkdir(parents=True)  # what a crashed run leaves behind: never trusted, cleaned up
    out = prepare(str(corrupt_dir), tmp_path, on_bad_image="skip", progress=False)
    assert not stale.exists()
    table = source_table(corrupt_dir, "train")
    assert out.skipped == 1 and out.counts["train"] == 47 and out.decoded == 80
    (rec,) = out.meta["splits"]["train"]["skipped"]
    assert rec["row"] == BAD_ROW and rec["path"] == table.column("image")[BAD_ROW].as_py()["path"]
    keep = np.delete(np.arange(48), BAD_ROW)
    assert np.array_equal(out.source_rows("train"), keep)
    assert np.array_equal(out.labels("train"), table.column("label").to_numpy()[keep])
    for cache_row in (BAD_ROW - 1, BAD_ROW, 46):
        ref = pil_square(table.column("image")[int(keep[cache_row])].as_py()["bytes"])
        assert np.abs(ref.astype(np.int16) - out.images("train")[cache_row]).max() <= 1
    # The skipping cache is reused, but not silently by a run that asks to fail on bad images.
    assert prepare(str(corrupt_dir), tmp_path, on_bad_image="skip", progress=False).decoded == 0
    with pytest.raises(RaysweepError, match=f"split 'train' row {BAD_ROW}"):
        prepare(str(corrupt_dir), tmp_path, on_bad_image="fail", progress=False)


def test_missing_split_is_an_error(synthetic_dir, tmp_path):
    shutil.copytree(synthetic_dir, tmp_path / "set")
    os.remove(split_file(tmp_path / "set", "test"))
    with pytest.raises(RaysweepError, match=r"split 'test' is missing \(splits found in data/: train, validation\)"):
        prepare(str(tmp_path / "set"), tmp_path / "cache", progress=False)


def test_empty_split_is_an_error(synthetic_dir, tmp_path):
    root = copy_with(synthetic_dir, tmp_path / "set", "validation", lambda t: t.slice(0, 0))
    with pytest.raises(RaysweepError, match="split 'validation' is empty"):
        prepare(str(root), tmp_path / "cache", progress=False)


def test_label_outside_the_class_range_is_an_error(synthetic_dir, tmp_path):
    def relabel(t):
        labels = t.column("label").to_numpy().copy()
        labels[3] = 9
        return t.set_column(1, "label", pa.array(labels, pa.int64()))

    root = copy_with(synthetic_dir, tmp_path / "set", "validation", relabel)
    with pytest.raises(RaysweepError, match=r"validation-00000-of-00001.parquet row 3 \(split 'validation' row 3\): "
                                            r"label 9 in column 'label' is outside the class range \[0, 4\)"):
        prepare(str(root), tmp_path / "cache", progress=False)


def test_paths_are_never_sent_to_the_hub(monkeypatch, tmp_path):
    import raysweep.data.source as source

    monkeypatch.setattr(source, "_download_hub", lambda repo, *a: pytest.fail(f"{repo} was sent to the hub"))
    for path in ["./timm/mini-imagenet", "/no/such/dir", "~/no-such-raysweep-dir"]:
        with pytest.raises(RaysweepError, match="no such file or directory"):
            resolve_source(path)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(RaysweepError, match="is not a directory"):
        resolve_source(str(tmp_path / "afile"))


def test_synthetic_source_is_generated_once_into_the_cache(ray_session, tmp_path):
    params = dict(classes=2, train_per_class=3, val_per_class=1, test_per_class=1)
    first = prepare("synthetic", tmp_path, synthetic=params, progress=False)
    assert first.counts == {"train": 6, "validation": 2, "test": 2} and first.decoded == 10
    (generated,) = (tmp_path / "synthetic").iterdir()
    assert prepare("synthetic", tmp_path, synthetic=params, progress=False).decoded == 0
    assert list((tmp_path / "synthetic").iterdir()) == [generated]


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "raysweep.prepare", *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})})


def _one_error_line(run) -> str:
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("raysweep: error:")]
    assert len(errors) == 1, run.stderr
    return errors[0]


@pytest.mark.slow  # a real run of its own, ~10 s: make test-e2e
def test_cli_reports_a_corrupt_image_in_one_line(ray_cluster, corrupt_dir, tmp_path):
    path = source_table(corrupt_dir, "train").column("image")[BAD_ROW].as_py()["path"]
    line = _one_error_line(_cli("--data", str(corrupt_dir), "--cache-dir", str(tmp_path), "--quiet",
                                "--address", ray_cluster))
    assert f"split 'train' row {BAD_ROW}" in line and path in line


def test_cli_hub_failure_and_bad_path_are_one_line(tmp_path):
    offline = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    line = _one_error_line(_cli("--data", "timm/mini-imagenet", "--cache-dir", str(tmp_path), env=offline))
    assert "'timm/mini-imagenet'" in line and "Hugging Face hub" in line
    line = _one_error_line(_cli("--data", str(tmp_path / "missing"), "--cache-dir", str(tmp_path)))
    assert "missing': no such file or directory" in line


# --- a source without a validation split: carving, on the shipped real photos -----------------

def test_cli_prepares_the_builtin_set_with_progress_and_nothing_from_ray(ray_cluster, tmp_path_factory):
    cache = tmp_path_factory.getbasetemp() / "builtin-cache"
    run = _cli("--data", "builtin:cifar10-sample", "--cache-dir", str(cache), "--image-size", "32",
               "--address", ray_cluster)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert any(line.split() == ["train", "1800", "0", "train"] for line in lines), run.stdout
    assert any(line.split() == ["validation", "200", "0", "train"] for line in lines), run.stdout
    assert any(line.split() == ["test", "2000", "0", "test"] for line in lines), run.stdout
    # A pipe gets plain progress lines (rate, ETA) and none of Ray Data's own output.
    final = [line for line in run.stderr.splitlines() if line.startswith("decoding: 4,000/4,000 img (100%)")]
    assert final and "img/s" in final[0] and "ETA" in final[0], run.stderr
    for noise in ("\x1b[", "INFO", "Progress bars", "streaming_executor", "Traceback"):
        assert noise not in run.stderr + run.stdout, noise


@pytest.fixture(scope="module")
def carved(ray_session, tmp_path_factory) -> PreparedData:
    """The built-in set at 32 px (the CLI test above may already have decoded it)."""
    return prepare("builtin:cifar10-sample", tmp_path_factory.getbasetemp() / "builtin-cache", image_size=32,
                   progress=False)


def test_carved_validation_is_recorded_stratified_and_routed_from_train(carved):
    from raysweep.data import carve_validation

    src = resolve_source("builtin:cifar10-sample")
    train = pq.read_table(src.files["train"][0])
    source_labels = train.column("label").to_numpy()
    assert carved.counts == {"train": 1800, "validation": 200, "test": 2000}
    assert carved.num_classes == 10 and carved.class_names[0] == "airplane"
    val_rows = carved.source_rows("validation")
    assert carved.carved == {"from": "train", "fraction": 0.1, "seed": 0, "rows": val_rows.tolist()}
    assert np.array_equal(val_rows, carve_validation(source_labels, 0.1, 0))
    assert np.bincount(carved.labels("validation")).tolist() == [20] * 10
    assert np.array_equal(carved.source_rows("train"), np.setdiff1d(np.arange(2000), val_rows))
    assert carved.meta["splits"]["validation"]["source_split"] == "train"
    # Each cache row holds the pixels and label of its source row (PIL decoder at 32 px: exact).
    for split in ("train", "validation"):
        rows = carved.source_rows(split)
        assert np.array_equal(carved.labels(split), source_labels[rows])
        for i in (0, len(rows) // 2, len(rows) - 1):
            data = train.column("img")[int(rows[i])].as_py()["bytes"]
            assert np.array_equal(carved.images(split)[i], pil_square(data, 32)), (split, i)
    # The test split is untouched: every row, in order.
    test = pq.read_table(src.files["test"][0])
    assert np.array_equal(carved.source_rows("test"), np.arange(2000))
    assert np.array_equal(carved.labels("test"), test.column("label").to_numpy())


def test_no_training_subset_of_the_cache_holds_a_carved_row(carved):
    val = set(carved.source_rows("validation").tolist())
    train_rows = carved.source_rows("train")
    for seed in range(3):
        for fraction in (1.0, 0.5, 0.25, 0.125):
            picked = train_rows[stratified_subset(carved.labels("train"), fraction, seed)]
            assert not val & set(picked.tolist())


def test_the_carving_settings_key_the_cache_only_when_there_is_carving(carved, synthetic_dir):
    builtin, hub_like = resolve_source("builtin:cifar10-sample"), resolve_source(str(synthetic_dir))
    base = cache_path("/c", builtin, 32, "pil")
    assert base.name == carved.path.name and carved.meta["decoder"] == "pil"  # decoder "auto": 32 px photos
    assert cache_path("/c", builtin, 32, "pil", val_seed=1) != base
    assert cache_path("/c", builtin, 32, "pil", val_fraction=0.2) != base
    assert cache_path("/c", hub_like, 32, "pil", val_seed=1, val_fraction=0.2) == cache_path("/c", hub_like, 32, "pil")


def test_a_skipped_image_in_a_carved_row_leaves_validation_and_train_consistent(ray_session, tmp_path):
    from raysweep.data import carve_validation
    from raysweep.data.synthetic import write_synthetic

    root = write_synthetic(tmp_path / "set", classes=3, train_per_class=6, val_per_class=0, test_per_class=2,
                           folder="plain_text", size=(16, 16))
    path = root / "plain_text" / "train-00000-of-00001.parquet"
    labels = pq.read_table(path).column("label").to_numpy()
    val = carve_validation(labels, 0.34, seed=0)  # 2 of each class's 6
    bad = int(val[1])
    table = pq.read_table(path)
    pq.write_table(truncate_row(table, bad).replace_schema_metadata(table.schema.metadata), path)
    out = prepare(str(root), tmp_path / "cache", on_bad_image="skip", image_size=16, progress=False,
                  val_fraction=0.34)
    assert out.counts == {"train": 12, "validation": 5, "test": 6}
    assert np.array_equal(out.source_rows("validation"), np.delete(val, 1))
    assert out.meta["splits"]["validation"]["skipped"][0]["row"] == bad
    assert np.array_equal(out.labels("validation"), labels[np.delete(val, 1)])
    assert np.array_equal(out.source_rows("train"), np.setdiff1d(np.arange(18), val))
