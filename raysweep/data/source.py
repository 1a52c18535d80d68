"""Resolve `--data SOURCE` to parquet files per split, class names and a fingerprint.

SOURCE is a Hugging Face dataset id (downloaded into the HF cache), a local directory in
the hub's layout, or "synthetic" (generated once into the cache directory).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raysweep.errors import RaysweepError

SPLITS = ("train", "validation", "test")
# A hub id is `name` or `owner/name`; anything else (or anything that exists locally) is a path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
SYNTHETIC_DEFAULTS = {"classes": 10, "train_per_class": 40, "val_per_class": 10,
                      "test_per_class": 10, "seed": 0}


@dataclass
class Source:
    """A dataset on local disk: parquet files per split, in row order."""

    name: str                       # what the user passed as SOURCE
    root: Path                      # the directory holding the files
    files: dict[str, list[Path]]    # split -> parquet files, sorted (shard order = row order)
    class_names: list[str] | None   # from the ClassLabel metadata, if the files carry it
    fingerprint: str = field(default="")


def looks_like_path(source: str) -> bool:
    return source.startswith((".", "/", "~")) or os.path.exists(source) or not _HUB_ID.match(source)


def resolve_source(source: str, cache_dir: str | os.PathLike | None = None,
                   synthetic: dict | None = None) -> Source:
    """SOURCE -> `Source`. Paths are never sent to the hub; a bad path names itself."""
    source = str(source)
    if source == "synthetic":
        root = _synthetic_root(cache_dir, synthetic or {})
    elif looks_like_path(source):
        root = Path(source).expanduser()
        if not root.exists():
            raise RaysweepError(f"data source '{source}': no such file or directory")
        if not root.is_dir():
            raise RaysweepError(f"data source '{source}' is not a directory (expected a directory "
                                "holding data/train-*.parquet, data/validation-*.parquet, data/test-*.parquet)")
    else:
        root = _download_hub(source)
    files = _split_files(root, source)
    src = Source(name=source, root=root.resolve(), files=files, class_names=_class_names(files))
    src.fingerprint = _fingerprint(src)
    return src


def _split_files(root: Path, source: str) -> dict[str, list[Path]]:
    files = {}
    for split in SPLITS:
        found = sorted((root / "data").glob(f"{split}-*.parquet")) or sorted(root.glob(f"{split}-*.parquet"))
        if not found:
            raise RaysweepError(f"data source '{source}': split '{split}' is missing: no {split}-*.parquet "
                                f"in {root / 'data'} or {root}")
        for path in found:
            _check_schema(path, split)
        files[split] = found
    return files


def _check_schema(path: Path, split: str) -> None:
    try:
        schema = pq.read_schema(path)
    except Exception as err:  # pyarrow raises several types for a file that is not parquet
        raise RaysweepError(f"split '{split}': cannot read parquet file {path}: {err}") from None
    for name in ("image", "label"):
        if name not in schema.names:
            raise RaysweepError(f"split '{split}': {path} has no column '{name}' (columns: {', '.join(schema.names)})")
    t = schema.field("image").type
    if not (pa.types.is_binary(t) or pa.types.is_large_binary(t)
            or (pa.types.is_struct(t) and t.get_field_index("bytes") >= 0 and t.get_field_index("path") >= 0)):
        raise RaysweepError(f"split '{split}': column 'image' of {path} must be struct<bytes, path> or binary, got {t}")


def _class_names(files: dict[str, list[Path]]) -> list[str] | None:
    """ClassLabel names from the `huggingface` schema metadata of the first training file."""
    raw = (pq.read_schema(files["train"][0]).metadata or {}).get(b"huggingface")
    if not raw:
        return None
    try:
        label = json.loads(raw)["info"]["features"]["label"]
    except (ValueError, KeyError, TypeError):
        return None
    names = label.get("names") if isinstance(label, dict) else None
    return [str(n) for n in names] if names else None


def read_labels(paths: list[Path], split: str) -> np.ndarray:
    """The `label` column of one split, in row order, as int64 (reads no image bytes)."""
    parts = []
    for path in paths:
        try:
            table = pq.read_table(path, columns=["label"])
        except Exception as err:
            raise RaysweepError(f"split '{split}': cannot read column 'label' of {path}: {err}") from None
        col = table.column("label")
        if col.null_count:
            raise RaysweepError(f"split '{split}': {path} has {col.null_count} rows without a label")
        if not pa.types.is_integer(col.type):
            raise RaysweepError(f"split '{split}': column 'label' of {path} must be integer, got {col.type}")
        parts.append(col.to_numpy().astype(np.int64))
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def _fingerprint(src: Source) -> str:
    """Cheap identity of the files: path, size, mtime. A rewritten file gets a new cache."""
    h = hashlib.sha256()
    for split, paths in src.files.items():
        for p in paths:
            st = p.stat()
            h.update(f"{split}\0{p.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _synthetic_root(cache_dir, params: dict) -> Path:
    """Generate the synthetic set once per parameter set, atomically, under the cache dir."""
    from raysweep.synthetic import write_synthetic

    unknown = set(params) - set(SYNTHETIC_DEFAULTS)
    if unknown:
        raise RaysweepError(f"unknown synthetic parameter(s): {', '.join(sorted(unknown))}")
    args = {**SYNTHETIC_DEFAULTS, **params}
    if cache_dir is None:
        raise RaysweepError("data source 'synthetic' needs a cache directory to generate into")
    tag = "-".join(f"{k}{v}" for k, v in args.items())
    root = Path(cache_dir).expanduser() / "synthetic" / tag
    if (root / "data").is_dir():
        return root
    tmp = root.with_name(f".tmp-{tag}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    write_synthetic(tmp, **args)
    try:
        os.rename(tmp, root)
    except OSError:  # another process finished first; its copy is identical
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def _download_hub(repo_id: str) -> Path:
    """Fetch the parquet shards of a hub dataset into the HF cache (honours HF_TOKEN, HF_HOME)."""
    try:
        from huggingface_hub import snapshot_download

        path = snapshot_download(repo_id, repo_type="dataset",
                                 allow_patterns=["data/*.parquet", "*.parquet"],
                                 token=os.environ.get("HF_TOKEN") or None)
    except Exception as err:
        kind = type(err).__name__
        raise RaysweepError(
            f"data source '{repo_id}': could not fetch it from the Hugging Face hub ({kind}: "
            f"{str(err).splitlines()[0] if str(err) else 'no detail'}). Check the network and HF_TOKEN, "
            f"or pass a local directory holding data/train-*.parquet etc. (a path starting with ./ or /)"
        ) from None
    return Path(path)
