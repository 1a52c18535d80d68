"""Resolve `--data SOURCE` to parquet files per split, their columns, class names and a fingerprint.

SOURCE is a Hugging Face dataset id (downloaded into the HF cache), a local directory in
one of the hub's layouts (`raysweep.data.layout`), "synthetic" (generated once into the
cache directory) or `builtin:<name>` (a small set shipped with the package).
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raysweep.data.fingerprint import dataset_fingerprint
from raysweep.data.layout import SPLIT_ALIASES, describe_configs, find_layout, group_files, hub_patterns
from raysweep.errors import RaysweepError

SPLITS = tuple(SPLIT_ALIASES)  # the splits of a prepared cache: train, validation, test
BUILTIN_PREFIX = "builtin:"
BUILTIN_DIR = Path(__file__).resolve().parent / "builtin"
# A hub id is `name` or `owner/name`; anything else (or anything that exists locally) is a path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
# The first request to the hub: one try with this timeout, so that with no network the user
# hears so in seconds, not after huggingface_hub's 30 s of retries.
HUB_PROBE_TIMEOUT_S = 2.0
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
    image_column: str = "image"
    label_column: str = "label"
    config: str = ""                # the config folder read ("data", "plain_text", "." = top level)
    split_names: dict[str, str] = field(default_factory=dict)  # split -> name on disk ("valid", ...)
    revision: str = ""              # a hub download's commit ("" for local files)

    @property
    def has_validation(self) -> bool:
        """False when the validation split must be carved from train at prepare time."""
        return "validation" in self.files


def looks_like_path(source: str) -> bool:
    if source.startswith(BUILTIN_PREFIX):
        return False
    return source.startswith((".", "/", "~")) or os.path.exists(source) or not _HUB_ID.match(source)


def builtin_names() -> list[str]:
    """The sets shipped with the package (folders under raysweep/data/builtin/)."""
    return sorted(p.name for p in BUILTIN_DIR.iterdir() if p.is_dir() and (p / "README.md").is_file())


def builtin_root(source: str) -> Path:
    name = source[len(BUILTIN_PREFIX):]
    names = builtin_names()
    if name not in names:
        raise RaysweepError(f"data source '{source}': no such built-in set "
                            f"(built-in: {', '.join(BUILTIN_PREFIX + n for n in names) or 'none'})")
    return BUILTIN_DIR / name


def resolve_source(source: str, cache_dir: str | os.PathLike | None = None, synthetic: dict | None = None,
                   *, config: str = "", image_column: str = "", label_column: str = "",
                   fingerprint: bool = True) -> Source:
    """SOURCE -> `Source`. Paths are never sent to the hub; a bad path names itself.

    `config`, `image_column` and `label_column` are data.config, data.image_column and
    data.label_column ("" = detect). A layout problem raises one RaysweepError naming them all.
    `fingerprint=False` skips the content hash (`raysweep.data.fingerprint`), for checks that
    do not need it; `cache_dir` holds its memo.
    """
    source = str(source)
    revision = ""
    if source == "synthetic":
        root = _synthetic_root(cache_dir, synthetic or {})
    elif source.startswith(BUILTIN_PREFIX):
        root = builtin_root(source)
    elif looks_like_path(source):
        root = Path(source).expanduser()
        if not root.exists():
            raise RaysweepError(f"data source '{source}': no such file or directory")
        if not root.is_dir():
            raise RaysweepError(f"data source '{source}' is not a directory (expected a directory holding "
                                "{config}/{split}-*.parquet, e.g. data/train-*.parquet, or {split}-*.parquet)")
    else:
        root, revision = _download_hub(source, config)
    root = root.resolve()
    layout = find_layout(root, source, config, image_column, label_column)
    src = Source(name=source, root=root, files=layout.files, class_names=layout.class_names,
                 image_column=layout.image_column, label_column=layout.label_column,
                 config=layout.config, split_names=layout.split_names, revision=revision)
    if fingerprint:
        src.fingerprint = dataset_fingerprint(root, src.files, cache_dir, revision)
    return src


def synthetic_params(data_cfg) -> dict | None:
    """The synthetic set's shape from a DataConfig (None unless data.source is "synthetic")."""
    if data_cfg.source != "synthetic":
        return None
    return {"classes": data_cfg.synthetic_classes, "train_per_class": data_cfg.synthetic_train_per_class,
            "val_per_class": data_cfg.synthetic_val_per_class,
            "test_per_class": data_cfg.synthetic_test_per_class, "seed": data_cfg.synthetic_seed}


def check_local_source(data_cfg) -> None:
    """Refuse a bad local or built-in source (missing path, layout, columns) in well under a second.

    Hub ids and "synthetic" pass: they need a download or a generator to be checked.
    """
    src = str(data_cfg.source)
    if src == "synthetic" or not (src.startswith(BUILTIN_PREFIX) or looks_like_path(src)):
        return
    resolve_source(src, config=data_cfg.config, image_column=data_cfg.image_column,
                   label_column=data_cfg.label_column, fingerprint=False)


def read_labels(paths: list[Path], split: str, column: str = "label") -> np.ndarray:
    """The label column of one split, in row order, as int64 (reads no image bytes)."""
    parts = []
    for path in paths:
        try:
            table = pq.read_table(path, columns=[column])
        except Exception as err:
            raise RaysweepError(f"split '{split}': cannot read column '{column}' of {path}: {err}") from None
        col = table.column(column)
        if col.null_count:
            raise RaysweepError(f"split '{split}': {path} has {col.null_count} rows without a label "
                                f"(column '{column}')")
        if not pa.types.is_integer(col.type):
            raise RaysweepError(f"split '{split}': column '{column}' of {path} must be integer, got {col.type}")
        parts.append(col.to_numpy().astype(np.int64))
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def check_label_range(split: str, paths: list[Path], labels: np.ndarray, num_classes: int,
                      column: str = "label") -> None:
    """A label outside [0, num_classes) is an error naming the file and its row there."""
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if not bad.size:
        return
    row, value = int(bad[0]), int(labels[bad[0]])
    start = 0
    for path in paths:
        n = pq.ParquetFile(path).metadata.num_rows
        if row < start + n:
            break
        start += n
    hint = " (-1 is the hub's mark for 'no label': a split without labels cannot be scored)" if value == -1 else ""
    raise RaysweepError(f"{path} row {row - start} (split '{split}' row {row}): label {value} in column "
                        f"'{column}' is outside the class range [0, {num_classes}); {bad.size} such "
                        f"row{'s' if bad.size > 1 else ''} in the split{hint}")


def _synthetic_root(cache_dir, params: dict) -> Path:
    """Generate the synthetic set once per parameter set, atomically, under the cache dir."""
    from raysweep.data.synthetic import write_synthetic

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


def _download_hub(repo_id: str, config: str = "") -> tuple[Path, str]:
    """Fetch the split files of a hub dataset (one config only) into the HF cache: (path, commit).

    Honours HF_TOKEN, HF_HOME, HF_ENDPOINT and HF_HUB_OFFLINE. One request without retries asks
    for the repo's commit and file list; the file list picks the config when data.config is
    empty, so a repo with several is refused before anything is downloaded. Only split files are
    fetched: a repo's extra splits (e.g. an unlabeled one) cost nothing. With the hub out of
    reach, a copy already in the HF cache is used, else the error says so within seconds.
    """
    token = os.environ.get("HF_TOKEN") or None
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        info = HfApi().dataset_info(repo_id, timeout=HUB_PROBE_TIMEOUT_S, token=token)
    except (RepositoryNotFoundError, GatedRepoError) as err:
        raise RaysweepError(f"data source '{repo_id}': {_first_line(err)} (a private or gated dataset needs "
                            "HF_TOKEN; a local directory must start with ./ or /)") from None
    except Exception as err:  # no network, offline mode, the hub down: the HF cache may hold it
        return _from_hf_cache(repo_id, config, token, err)
    if not config:
        groups = group_files([s.rfilename for s in info.siblings or []])
        if len(groups) > 1:
            raise RaysweepError(f"data source '{repo_id}': several configs on the hub: choose one with "
                                f"data.config. Configs seen: {describe_configs(groups)}")
        config = next(iter(groups), "")
    try:
        path = snapshot_download(repo_id, repo_type="dataset", revision=info.sha, token=token,
                                 allow_patterns=hub_patterns(config))
    except Exception as err:
        raise RaysweepError(f"data source '{repo_id}': could not fetch it from the Hugging Face hub "
                            f"({_first_line(err)}). Check the network and HF_TOKEN, or pass a local directory "
                            "in the hub layout (a path starting with ./ or /)") from None
    return Path(path), info.sha or ""


def _from_hf_cache(repo_id: str, config: str, token, why: Exception) -> tuple[Path, str]:
    from huggingface_hub import constants, snapshot_download

    try:
        path = Path(snapshot_download(repo_id, repo_type="dataset", token=token, local_files_only=True,
                                      allow_patterns=hub_patterns(config)))
    except Exception:
        endpoint = constants.ENDPOINT
        raise RaysweepError(
            f"data source '{repo_id}': the Hugging Face hub at {endpoint} cannot be reached "
            f"({_first_line(why)}) and the HF cache ({constants.HF_HUB_CACHE}) has no copy. Check the network "
            "(HF_ENDPOINT, a proxy) and HF_TOKEN, or pass a local directory in the hub layout "
            "(a path starting with ./ or /)") from None
    # The HF cache keeps each commit's files under snapshots/<commit>.
    return path, path.name if path.parent.name == "snapshots" else ""


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else 'no detail'}"
