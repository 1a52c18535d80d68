"""resolve_source: built-in sets, the hub download path, label checks; and the vendored CIFAR-10 sample."""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

import raysweep.data.source as source
from raysweep.config import DataConfig
from raysweep.data import builtin_names, check_local_source, prepare, resolve_source
from raysweep.data.layout import hub_patterns
from raysweep.data.sample import main as sample_main
from raysweep.errors import RaysweepError
from raysweep.data.synthetic import write_synthetic

REPO = Path(__file__).resolve().parent.parent
SAMPLE = Path(source.__file__).parent / "builtin" / "cifar10-sample"
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def sample_file(split: str) -> Path:
    return SAMPLE / "plain_text" / f"{split}-00000-of-00001.parquet"


# --- the vendored set ----------------------------------------------------------------------

def test_builtin_source_resolves_to_the_vendored_hub_layout():
    src = resolve_source("builtin:cifar10-sample")
    assert builtin_names() == ["cifar10-sample"]
    assert src.root == SAMPLE.resolve() and src.config == "plain_text"
    assert src.files == {"train": [sample_file("train").resolve()], "test": [sample_file("test").resolve()]}
    assert (src.image_column, src.label_column) == ("img", "label")
    assert src.class_names == CIFAR10_CLASSES and not src.has_validation
    assert not source.looks_like_path("builtin:cifar10-sample")


def test_unknown_builtin_lists_the_builtin_names():
    with pytest.raises(RaysweepError, match=r"no such built-in set \(built-in: builtin:cifar10-sample\)"):
        resolve_source("builtin:cifar100")


def test_vendored_set_has_the_hub_schema_and_balanced_interleaved_rows():
    want_rows = {"train": 200, "test": 200}
    for split, per_class in want_rows.items():
        table = pq.read_table(sample_file(split))
        assert table.schema.names == ["img", "label"]
        assert table.schema.field("img").type == pa.struct([("bytes", pa.binary()), ("path", pa.string())])
        assert table.schema.field("label").type == pa.int64()
        features = json.loads(table.schema.metadata[b"huggingface"])["info"]["features"]
        assert features == {"img": {"_type": "Image"}, "label": {"names": CIFAR10_CLASSES, "_type": "ClassLabel"}}
        labels = table.column("label").to_numpy()
        assert Counter(labels.tolist()) == {c: per_class for c in range(10)}
        assert labels[:20].tolist() == list(range(10)) * 2, "rows stay interleaved across classes, as in the source"
        for row in table.column("img").to_pylist()[:: len(labels) // 7]:
            with Image.open(io.BytesIO(row["bytes"])) as im:
                im.load()  # decodes: real pixels, not a header
                assert (im.format, im.mode, im.size) == ("JPEG", "RGB", (32, 32))
    size = sum(p.stat().st_size for p in SAMPLE.rglob("*.parquet"))
    assert size < 3e6, f"the vendored set should stay a few MB, is {size / 1e6:.1f} MB"


def test_vendored_readme_states_provenance_and_the_counts_in_the_files():
    text = (SAMPLE / "README.md").read_text()
    for fact in ("CIFAR-10", "Krizhevsky", "2009", "uoft-cs/cifar10", "python -m raysweep.data.sample",
                 "--per-class train=200 test=200", "| `train` | 2,000 | 200 |", "| `test` | 2,000 | 200 |"):
        assert fact in text, fact


def test_sample_script_takes_the_first_rows_of_each_class_keeping_schema_and_order(tmp_path, capsys):
    assert sample_main([str(SAMPLE), str(tmp_path / "small"), "--per-class", "train=30", "test=5"]) == 0
    for split, n in {"train": 30, "test": 5}.items():
        small = pq.read_table(tmp_path / "small" / "plain_text" / f"{split}-00000-of-00001.parquet")
        full = pq.read_table(sample_file(split))
        labels = full.column("label").to_numpy()
        rows = np.sort(np.concatenate([np.flatnonzero(labels == c)[:n] for c in range(10)]))
        assert small.schema.equals(full.schema, check_metadata=True)
        assert small.equals(full.take(pa.array(rows)))
    assert "train: 300 rows" in capsys.readouterr().out
    assert sample_main([str(SAMPLE), str(tmp_path / "x"), "--per-class", "train=201"]) == 2
    assert "split 'train': class 0 has 200 rows, fewer than 201" in capsys.readouterr().err


# --- the hub download path, on local files in the hub's exact schema ------------------------

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """The hub replaced by a local 'repo': dataset_info lists its files at COMMIT, and
    snapshot_download copies them, filtered by allow_patterns as the hub does."""
    from types import SimpleNamespace

    from huggingface_hub.utils import filter_repo_objects

    repo = tmp_path / "repo"
    write_synthetic(repo, classes=2, train_per_class=3, val_per_class=0, test_per_class=1, folder="plain_text",
                    image_column="img", size=(8, 8))
    write_synthetic(repo, classes=2, train_per_class=3, val_per_class=1, test_per_class=1, folder="grey",
                    size=(8, 8))
    shutil.copy(repo / "plain_text" / "train-00000-of-00001.parquet", repo / "plain_text" / "unlabeled-00000-of-00001.parquet")
    (repo / "README.md").write_text("card")
    calls = []

    def repo_files():
        return [p.relative_to(repo).as_posix() for p in repo.rglob("*") if p.is_file()]

    def snapshot_download(repo_id, *, repo_type, allow_patterns, token, revision=None, local_files_only=False):
        calls.append((repo_id, repo_type, allow_patterns, revision))
        snap = tmp_path / "snapshot" / str(len(calls))
        for rel in filter_repo_objects(repo_files(), allow_patterns=allow_patterns):
            (snap / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(repo / rel, snap / rel)
        return str(snap)

    def dataset_info(self, repo_id, *, timeout=None, token=None):
        assert timeout is not None and timeout <= 3, "the first request to the hub must time out quickly"
        return SimpleNamespace(sha=COMMIT, siblings=[SimpleNamespace(rfilename=f) for f in repo_files()])

    monkeypatch.setattr("huggingface_hub.snapshot_download", snapshot_download)
    monkeypatch.setattr("huggingface_hub.HfApi.dataset_info", dataset_info)
    return repo, calls


def test_a_hub_id_downloads_split_files_only_and_reads_the_chosen_config(fake_hub):
    repo, calls = fake_hub
    with pytest.raises(RaysweepError, match=r"several configs on the hub: choose one with data.config. "
                                            r"Configs seen: grey/ \(train, validation, test\), plain_text/ \(train, test\)"):
        resolve_source("someone/cifar-like")
    assert calls == [], "a repo with several configs is refused before any download"
    src = resolve_source("someone/cifar-like", config="plain_text")
    assert [c[0] for c in calls] == ["someone/cifar-like"] and calls[0][1] == "dataset"
    assert calls[0][3] == COMMIT and src.revision == COMMIT, "the files of the commit the file list came from"
    assert sorted(p.relative_to(src.root).as_posix() for p in src.root.rglob("*.parquet")) == [
        "plain_text/test-00000-of-00001.parquet", "plain_text/train-00000-of-00001.parquet"]
    assert (src.config, src.image_column, list(src.files)) == ("plain_text", "img", ["train", "test"])
    # With one config on the hub, data.config can stay empty and only that config is fetched.
    shutil.rmtree(repo / "grey")
    again = resolve_source("someone/cifar-like")
    assert calls[-1][2] == hub_patterns("plain_text") and again.config == "plain_text"
    # Named by its commit and file names: the same commit downloaded to another folder is the same data.
    assert again.root != src.root and again.fingerprint == src.fingerprint


def test_a_hub_id_without_network_fails_in_seconds_naming_the_id_and_the_problem(tmp_path):
    """HF_ENDPOINT at a closed port: connection refused at once; without the one-try probe,
    huggingface_hub's retries took 23-31 s before the error."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = ("import time, sys\nfrom raysweep.data import resolve_source\nt = time.monotonic()\n"
            "try:\n    resolve_source('someone/cifar-like')\nexcept Exception as e:\n"
            "    print(f'{time.monotonic() - t:.2f}', type(e).__name__, e)\n")
    env = {**os.environ, "HF_ENDPOINT": f"http://127.0.0.1:{port}", "HF_HOME": str(tmp_path / "hf"),
           "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    took, kind, message = proc.stdout.strip().split(" ", 2)
    assert kind == "RaysweepError" and float(took) < 3.0, proc.stdout + proc.stderr
    assert message.startswith("data source 'someone/cifar-like': the Hugging Face hub at "
                              f"http://127.0.0.1:{port} cannot be reached (ConnectError")
    assert "HF cache" in message and "Retry" not in proc.stderr, proc.stderr


# --- labels and early checks -----------------------------------------------------------------

def _with_label(root: Path, split: str, row: int, value: int) -> Path:
    path = root / "plain_text" / f"{split}-00000-of-00001.parquet"
    table = pq.read_table(path)
    labels = table.column("label").to_numpy().copy()
    labels[row] = value
    pq.write_table(table.set_column(1, "label", pa.array(labels, pa.int64())), path)
    return path


@pytest.mark.parametrize("value,hint", [(10, ""), (-1, "no label")])
def test_label_outside_the_class_range_is_one_line_naming_file_and_row(tmp_path, value, hint):
    """Checked before any image is decoded, so this needs no Ray."""
    root = write_synthetic(tmp_path / "set", classes=10, train_per_class=2, val_per_class=0, test_per_class=1,
                           folder="plain_text", image_column="img", size=(8, 8))
    path = _with_label(root, "test", 3, value)
    with pytest.raises(RaysweepError) as err:
        prepare(str(root), tmp_path / "cache", progress=False)
    msg = str(err.value)
    assert msg.startswith(f"{path} row 3 (split 'test' row 3): label {value} in column 'label' is outside "
                          "the class range [0, 10); 1 such row in the split")
    assert hint in msg and "\n" not in msg


def test_check_local_source_refuses_bad_local_sources_and_lets_hub_ids_pass(tmp_path, monkeypatch):
    monkeypatch.setattr(source, "_download_hub", lambda *a: pytest.fail("the early check must not download"))
    check_local_source(DataConfig(source="builtin:cifar10-sample"))
    check_local_source(DataConfig(source="uoft-cs/cifar10"))
    check_local_source(DataConfig(source="synthetic"))
    with pytest.raises(RaysweepError, match="no such file or directory"):
        check_local_source(DataConfig(source=str(tmp_path / "missing")))
    with pytest.raises(RaysweepError, match=r"no config 'rgb' \(data.config\)"):
        check_local_source(DataConfig(source="builtin:cifar10-sample", config="rgb"))
