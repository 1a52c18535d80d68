"""Hub layouts and column detection (raysweep.data.layout): pure, no Ray, on generated parquet.

Each fixture is written with the hub's exact schema (`raysweep.data.synthetic.hub_schema`), in
the layouts the hub uses: data/, a config folder such as plain_text/, and the top level.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raysweep.data.layout import find_layout, group_files, hub_patterns
from raysweep.errors import RaysweepError
from raysweep.data.synthetic import class_names, hub_schema, write_synthetic


def make_set(root, folder="data", image_column="image", val=True, classes=3):
    """A tiny hub-layout set (8x8 JPEGs): 4 train, 2 validation (unless val=False), 2 test per class."""
    return write_synthetic(root, classes=classes, train_per_class=4, val_per_class=2 if val else 0,
                           test_per_class=2, folder=folder, image_column=image_column, size=(8, 8))


def rewrite(path, edit):
    """Rewrite one parquet file through `edit(table) -> table`."""
    table = edit(pq.read_table(path))
    pq.write_table(table, path)


def drop_metadata(table: pa.Table) -> pa.Table:
    return table.replace_schema_metadata(None)


def one_line_error(fn) -> str:
    with pytest.raises(RaysweepError) as err:
        fn()
    msg = str(err.value)
    assert "\n" not in msg, msg
    return msg


@pytest.mark.parametrize("folder,config", [("data", "data"), ("plain_text", "plain_text"), ("", ".")])
@pytest.mark.parametrize("image_column", ["image", "img"])
def test_every_layout_and_image_column_is_found(tmp_path, folder, config, image_column):
    root = make_set(tmp_path / "set", folder, image_column, val=folder != "plain_text")
    layout = find_layout(root, "set")
    where = root / folder if folder else root
    assert layout.config == config and layout.configs == [config]
    want = ["train", "test"] if folder == "plain_text" else ["train", "validation", "test"]
    assert list(layout.files) == want  # canonical order; no validation means it will be carved
    for split in want:
        assert layout.files[split] == [where / f"{split}-00000-of-00001.parquet"]
    assert (layout.image_column, layout.label_column) == (image_column, "label")
    assert layout.class_names == class_names(3, 0)


@pytest.mark.parametrize("alias", ["valid", "val"])
def test_validation_aliases(tmp_path, alias):
    root = make_set(tmp_path / "set")
    os.rename(root / "data" / "validation-00000-of-00001.parquet", root / "data" / f"{alias}-00000-of-00001.parquet")
    layout = find_layout(root, "set")
    assert layout.files["validation"] == [root / "data" / f"{alias}-00000-of-00001.parquet"]
    assert layout.split_names == {"train": "train", "validation": alias, "test": "test"}


def test_shards_are_kept_in_order_and_other_files_ignored(tmp_path):
    paths = ["data/train-00001-of-00002.parquet", "data/train-00000-of-00002.parquet", "data/test.parquet",
             "data/unlabeled-00000-of-00001.parquet", "README.md", ".cache/huggingface/x/train-0.parquet",
             "a/b/train-0.parquet"]
    groups = group_files(paths)
    assert groups == {"data": {"train": {"train": ["data/train-00000-of-00002.parquet",
                                                   "data/train-00001-of-00002.parquet"]},
                               "test": {"test": ["data/test.parquet"]}}}


def test_columns_come_from_the_huggingface_features_before_names(tmp_path):
    """An Image feature named `picture` and a ClassLabel named `category` win over a plain `label`."""
    root = make_set(tmp_path / "set")
    names = class_names(3, 0)
    features = {"picture": {"_type": "Image"}, "label": {"dtype": "int64", "_type": "Value"},
                "category": {"names": names, "_type": "ClassLabel"}}
    for split in ("train", "validation", "test"):
        path = root / "data" / f"{split}-00000-of-00001.parquet"

        def edit(t):
            t = pa.table({"picture": t.column("image"), "label": pa.array(np.zeros(t.num_rows, np.int64)),
                          "category": t.column("label")})
            return t.replace_schema_metadata({"huggingface": json.dumps({"info": {"features": features}})})
        rewrite(path, edit)
    layout = find_layout(root, "set")
    assert (layout.image_column, layout.label_column, layout.class_names) == ("picture", "category", names)


def test_without_metadata_the_usual_names_are_used(tmp_path):
    """cifar100-like: `img`, `fine_label` and `coarse_label`, no features recorded."""
    root = make_set(tmp_path / "set", image_column="img")
    for split in ("train", "validation", "test"):
        rewrite(root / "data" / f"{split}-00000-of-00001.parquet",
                lambda t: drop_metadata(t.rename_columns(["img", "fine_label"])
                                        .append_column("coarse_label", pa.array(np.zeros(t.num_rows, np.int64)))))
    layout = find_layout(root, "set")
    assert (layout.image_column, layout.label_column, layout.class_names) == ("img", "fine_label", None)
    override = find_layout(root, "set", label_column="coarse_label")
    assert override.label_column == "coarse_label"


def test_two_classlabel_features_prefer_the_usual_name_and_override_picks_the_other(tmp_path):
    root = make_set(tmp_path / "set")
    fine, coarse = class_names(3, 0), ["animal", "vehicle"]
    features = {"img": {"_type": "Image"}, "fine_label": {"names": fine, "_type": "ClassLabel"},
                "coarse_label": {"names": coarse, "_type": "ClassLabel"}}
    for split in ("train", "validation", "test"):
        rewrite(root / "data" / f"{split}-00000-of-00001.parquet",
                lambda t: pa.table({"img": t.column("image"), "fine_label": t.column("label"),
                                    "coarse_label": pa.array(np.zeros(t.num_rows, np.int64))})
                .replace_schema_metadata({"huggingface": json.dumps({"info": {"features": features}})}))
    assert find_layout(root, "set").label_column == "fine_label"
    chosen = find_layout(root, "set", label_column="coarse_label")
    assert (chosen.label_column, chosen.class_names) == ("coarse_label", coarse)


def test_a_layout_problem_is_reported_whole_in_one_message(tmp_path):
    """No test split, no recognisable image column, and the configs seen: all in one line."""
    root = make_set(tmp_path / "set", folder="plain_text", val=False)
    os.remove(root / "plain_text" / "test-00000-of-00001.parquet")
    rewrite(root / "plain_text" / "train-00000-of-00001.parquet",
            lambda t: drop_metadata(t.rename_columns(["pic", "label"])))
    msg = one_line_error(lambda: find_layout(root, "my-set"))
    assert msg.startswith(f"data source 'my-set' ({root}): ")
    assert "split 'test' is missing (splits found in plain_text/: train)" in msg
    assert "no image column" in msg and "data.image_column" in msg
    assert "Configs seen: plain_text/ (train)" in msg
    assert "Columns found: pic (struct<bytes: binary, path: string>), label (int64)" in msg


def test_missing_train_and_test_are_both_named(tmp_path):
    root = make_set(tmp_path / "set")
    for split in ("train", "test"):
        os.remove(root / "data" / f"{split}-00000-of-00001.parquet")
    msg = one_line_error(lambda: find_layout(root, "set"))
    assert "splits 'train' and 'test' are missing (splits found in data/: validation)" in msg


def test_ambiguous_config_lists_every_config_and_data_config_picks_one(tmp_path):
    make_set(tmp_path / "set", folder="plain_text", val=False)
    make_set(tmp_path / "set", folder="grey")
    msg = one_line_error(lambda: find_layout(tmp_path / "set", "set"))
    assert "several configs: choose one with data.config" in msg
    assert "Configs seen: grey/ (train, validation, test), plain_text/ (train, test)" in msg
    assert find_layout(tmp_path / "set", "set", config="plain_text").config == "plain_text"
    assert find_layout(tmp_path / "set", "set", config="grey/").config == "grey"
    msg = one_line_error(lambda: find_layout(tmp_path / "set", "set", config="rgb"))
    assert "no config 'rgb' (data.config)" in msg and "grey/" in msg and "plain_text/" in msg


def test_an_empty_directory_says_what_is_expected(tmp_path):
    msg = one_line_error(lambda: find_layout(tmp_path, "empty"))
    assert "no split files (expected {config}/{split}-*.parquet" in msg and "Configs seen: none" in msg


def test_bad_overrides_and_bad_column_types_are_named(tmp_path):
    root = make_set(tmp_path / "set")
    msg = one_line_error(lambda: find_layout(root, "set", image_column="photo", label_column="y"))
    assert "data.image_column = 'photo' is not a column" in msg and "data.label_column = 'y' is not a column" in msg
    for split in ("train", "validation", "test"):
        rewrite(root / "data" / f"{split}-00000-of-00001.parquet",
                lambda t: t.set_column(1, "label", pa.array([str(v) for v in t.column("label").to_pylist()])))
    msg = one_line_error(lambda: find_layout(root, "set"))
    assert "label column 'label' must hold integers (a ClassLabel), got string" in msg


def test_a_split_file_that_disagrees_or_is_not_parquet_is_named(tmp_path):
    root = make_set(tmp_path / "set")
    test = root / "data" / "test-00000-of-00001.parquet"
    rewrite(test, lambda t: t.drop_columns(["label"]))
    (root / "data" / "validation-00000-of-00001.parquet").write_bytes(b"not parquet")
    msg = one_line_error(lambda: find_layout(root, "set"))
    assert f"split 'test': {test} has no column 'label'" in msg
    assert "cannot read parquet file" in msg and "validation-00000-of-00001.parquet" in msg


def test_hub_patterns_fetch_split_files_of_every_layout_and_only_the_chosen_config():
    from huggingface_hub.utils import filter_repo_objects

    repo = ["README.md", "data/train-00000-of-00002.parquet", "data/validation-00000-of-00001.parquet",
            "plain_text/train-00000-of-00001.parquet", "plain_text/test-00000-of-00001.parquet",
            "test-00000-of-00001.parquet", "valid.parquet", "plain_text/unlabeled-00000-of-00001.parquet",
            "grey/train-00000-of-00001.parquet"]
    got = set(filter_repo_objects(repo, allow_patterns=hub_patterns()))
    assert got == set(repo) - {"README.md", "plain_text/unlabeled-00000-of-00001.parquet"}
    got = set(filter_repo_objects(repo, allow_patterns=hub_patterns("plain_text")))
    assert got == {"plain_text/train-00000-of-00001.parquet", "plain_text/test-00000-of-00001.parquet"}


def test_hub_schema_writes_any_column_names():
    schema = hub_schema(["a", "b"], image_column="img", label_column="fine_label")
    features = json.loads(schema.metadata[b"huggingface"])["info"]["features"]
    assert schema.names == ["img", "fine_label"]
    assert features == {"img": {"_type": "Image"}, "fine_label": {"names": ["a", "b"], "_type": "ClassLabel"}}
