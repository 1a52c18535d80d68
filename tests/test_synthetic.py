"""The synthetic set: the hub's exact parquet schema, readable by `datasets` and Ray Data."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from raysweep.data.synthetic import write_synthetic

SPLITS = ("train", "validation", "test")
PER_CLASS = {"train": 12, "validation": 4, "test": 4}  # the session fixture's shape


def files(root):
    return {s: str(root / "data" / f"{s}-00000-of-00001.parquet") for s in SPLITS}


def test_files_have_the_hub_schema(synthetic_dir):
    for split, path in files(synthetic_dir).items():
        schema = pq.read_schema(path)
        assert schema.names == ["image", "label"]
        assert schema.field("image").type == pa.struct([("bytes", pa.binary()), ("path", pa.string())])
        assert schema.field("label").type == pa.int64()
        features = json.loads(schema.metadata[b"huggingface"])["info"]["features"]
        assert features["image"] == {"_type": "Image"}
        assert features["label"]["_type"] == "ClassLabel"
        names = features["label"]["names"]
        assert len(names) == 4 and names == sorted(names) and len(set(names)) == 4
        assert all(re.fullmatch(r"n\d{8}", n) for n in names), names


def test_splits_are_balanced_and_shuffled(synthetic_dir):
    for split, path in files(synthetic_dir).items():
        labels = pq.read_table(path).column("label").to_numpy()
        assert Counter(labels.tolist()) == {c: PER_CLASS[split] for c in range(4)}
    train = pq.read_table(files(synthetic_dir)["train"]).column("label").to_numpy()
    assert not np.all(np.diff(train) >= 0), "rows are shuffled, as on the hub"


def test_every_split_has_every_image_form(synthetic_dir):
    for split, path in files(synthetic_dir).items():
        forms, sizes = Counter(), set()
        for row in pq.read_table(path).column("image").to_pylist():
            with Image.open(io.BytesIO(row["bytes"])) as im:
                forms[(im.format, im.mode)] += 1
                sizes.add(im.size)
            assert row["path"].endswith((".JPEG", ".png"))
        for form in [("JPEG", "RGB"), ("JPEG", "L"), ("JPEG", "CMYK"), ("PNG", "RGB"), ("PNG", "P"), ("PNG", "RGBA")]:
            assert forms[form] >= 1, f"{split} lacks {form}: {forms}"
        assert forms[("JPEG", "RGB")] > len(forms) and len(sizes) > 3


def test_readable_by_datasets_with_features_intact(synthetic_dir, tmp_path):
    import datasets

    ds = datasets.load_dataset("parquet", data_files=files(synthetic_dir), cache_dir=str(tmp_path))
    names = json.loads(pq.read_schema(files(synthetic_dir)["train"]).metadata[b"huggingface"])["info"]["features"]["label"]["names"]
    for split in SPLITS:
        feats = ds[split].features
        assert isinstance(feats["image"], datasets.Image)
        assert isinstance(feats["label"], datasets.ClassLabel) and feats["label"].names == names
        assert len(ds[split]) == 4 * PER_CLASS[split]
    first = ds["train"][0]
    assert isinstance(first["image"], Image.Image) and first["image"].size[0] >= 120
    assert first["label"] == pq.read_table(files(synthetic_dir)["train"]).column("label")[0].as_py()


def test_readable_by_ray_data(ray_session, synthetic_dir):
    import ray

    ds = ray.data.read_parquet(files(synthetic_dir)["train"])
    schema = ds.schema()
    types = dict(zip(schema.names, schema.types))
    assert types["image"] == pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    assert types["label"] == pa.int64()
    rows = ds.take_all()
    assert len(rows) == 48
    with Image.open(io.BytesIO(rows[0]["image"]["bytes"])) as im:
        im.load()


def test_classes_carry_signal(synthetic_dir):
    """Cheap stand-in for learnability: nearest class mean of 16x16 thumbnails, far above chance."""
    def load(split):
        t = pq.read_table(files(synthetic_dir)[split])
        x = [np.asarray(Image.open(io.BytesIO(r["bytes"])).convert("RGB").resize((16, 16)), np.float32).ravel()
             for r in t.column("image").to_pylist()]
        return np.stack(x), t.column("label").to_numpy()

    xt, yt = load("train")
    xv, yv = load("validation")
    centroids = np.stack([xt[yt == c].mean(0) for c in range(4)])
    pred = ((xv[:, None, :] - centroids[None]) ** 2).sum(-1).argmin(1)
    assert (pred == yv).mean() >= 0.6  # chance is 0.25


def test_same_seed_same_data_other_seed_other_data(tmp_path):
    small = dict(classes=2, train_per_class=3, val_per_class=1, test_per_class=1)
    a = pq.read_table(files(write_synthetic(tmp_path / "a", seed=5, **small))["train"])
    b = pq.read_table(files(write_synthetic(tmp_path / "b", seed=5, **small))["train"])
    c = pq.read_table(files(write_synthetic(tmp_path / "c", seed=6, **small))["train"])
    assert a.equals(b)
    assert a.column("image").to_pylist() != c.column("image").to_pylist()


def test_cli_writes_the_layout_and_rejects_bad_sizes(tmp_path):
    out = tmp_path / "cli"
    run = subprocess.run([sys.executable, "-m", "raysweep.data.synthetic", str(out), "--classes", "3",
                          "--train-per-class", "2", "--val-per-class", "1", "--test-per-class", "1"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert pq.read_metadata(files(out)["train"]).num_rows == 6
    bad = subprocess.run([sys.executable, "-m", "raysweep.data.synthetic", str(out), "--classes", "0"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines() == ["raysweep: error: synthetic: classes must be >= 1, got 0"]
