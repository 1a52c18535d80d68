"""The decoded cache on disk: where it lives (its key) and how trials read it (`PreparedData`).

Layout: meta.json, and per split (train, validation, test) `images.npy` (N, S, S, 3) uint8,
`labels.npy` (N,) int64 and `rows.npy` (N,) int64: the row, in the source split it came
from, of each cache row (`meta["splits"][split]["source_split"]`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np

from raysweep.data.source import Source, looks_like_path
from raysweep.errors import RaysweepError

CACHE_VERSION = 2
# A read task copies rows at memory speed (a 64 px row is 12 KB), while each reader process
# costs ~2 CPU-s to start. So one reader takes every READER_BYTES of the selection, up to the
# caller's `concurrency`: the demo's splits (25 MB) get one process, a full mini-ImageNet
# subset at 227 px (7.7 GB) two. In a 4-trial demo-width sweep on 2 cores, one reader instead
# of two (with ray_compat's preemption watcher off too) took a trial's data load from 7-14 s to
# 4-10 s, and the sweep from 140 s to 126 s.
READER_BYTES = 256 * 2**20


class PreparedData:
    """A finished cache directory. Cheap to pickle: it holds the path and the metadata only."""

    def __init__(self, path: str | os.PathLike, meta: dict | None = None, decoded: int = 0):
        self.path = Path(path).expanduser().resolve()
        self.meta = meta if meta is not None else json.loads((self.path / "meta.json").read_text())
        # Images decoded by the call that returned this object: 0 when the cache was reused.
        self.decoded = decoded

    def __repr__(self) -> str:
        return f"PreparedData({str(self.path)!r}, counts={self.counts}, decoded={self.decoded})"

    @property
    def class_names(self) -> list[str]:
        return list(self.meta["class_names"])

    @property
    def num_classes(self) -> int:
        return int(self.meta["num_classes"])

    @property
    def counts(self) -> dict[str, int]:
        return {s: int(v["count"]) for s, v in self.meta["splits"].items()}

    @property
    def skipped(self) -> int:
        return int(self.meta["skipped"])

    @property
    def image_size(self) -> int:
        return int(self.meta["image_size"])

    @property
    def carved(self) -> dict | None:
        """How validation was carved from train ({"from", "fraction", "seed", "rows"}), or None."""
        return self.meta.get("carved")

    def _split_dir(self, split: str) -> Path:
        if split not in self.meta["splits"]:
            raise RaysweepError(f"unknown split '{split}' (prepared splits: {', '.join(self.meta['splits'])})")
        return self.path / split

    def labels(self, split: str) -> np.ndarray:
        return np.load(self._split_dir(split) / "labels.npy")

    def source_rows(self, split: str) -> np.ndarray:
        """Row in its source split of each cache row (meta["splits"][split]["source_split"])."""
        return np.load(self._split_dir(split) / "rows.npy")

    def images(self, split: str) -> np.ndarray:
        """The split's images as a read-only memory map (N, S, S, 3) uint8, for local use."""
        return np.load(self._split_dir(split) / "images.npy", mmap_mode="r")

    def dataset(self, split: str, indices=None, *, block_rows: int = 256, num_cpus: float = 0,
                concurrency: int = 2, read_node: bool = False):
        """A Ray Dataset with `image` (S, S, 3) uint8 and `label` int64, in cache row order.

        `indices` (e.g. a stratified subset) selects rows; they are read directly from the
        memory-mapped cache, so a small subset costs only its own bytes. Read tasks are pinned
        to this node, which is where the cache is known to exist, and reserve no CPU by default
        (they copy pages, and must not starve trials that hold every core); at most
        `concurrency` run at once, one per READER_BYTES of selected rows. With `read_node`, each
        row also carries `read_node`: the id of the node whose task read it, as Ray names it
        (NODE_ID_BYTES uint8; see node_ids), so a reader can show where its data was really read.
        """
        return self.datasets({split: indices}, block_rows=block_rows, num_cpus=num_cpus,
                             concurrency=concurrency, read_node=read_node)

    def datasets(self, parts: dict, *, block_rows: int = 256, num_cpus: float = 0, concurrency: int = 2,
                 read_node: bool = False):
        """Several splits in one Ray Dataset, so they are read in one execution: `parts` maps a
        split to its row indices (None: all of it). With more than one, each row carries `split`:
        the position of its split in `parts` (uint8). Otherwise as `dataset`."""
        import ray

        units, dirs, picks, nbytes = [], [], [], 0
        for code, (split, indices) in enumerate(parts.items()):
            d = self._split_dir(split)
            if not (d / "images.npy").is_file():
                raise RaysweepError(f"prepared cache {self.path} has no {split}/images.npy on this node")
            n = self.counts[split]
            idx = None
            if indices is not None:
                idx = np.asarray(indices, dtype=np.int64).reshape(-1)
                if idx.size and (idx.min() < 0 or idx.max() >= n):
                    raise RaysweepError(f"split '{split}': row indices must be in [0, {n}), "
                                        f"got {idx.min()}..{idx.max()}")
            total = n if idx is None else len(idx)
            if total == 0:
                raise RaysweepError(f"split '{split}': no rows selected")
            dirs.append(str(d))
            picks.append(idx)
            nbytes += total * 3 * self.image_size ** 2
            units += [{"part": code, "start": a, "stop": min(a + block_rows, total)} for a in range(0, total, block_rows)]
        if not ray.is_initialized():
            ray.init()
        node = ray.get_runtime_context().get_node_id()
        ds = ray.data.from_items(units, override_num_blocks=len(units)).map_batches(
            _read_rows, batch_size=1,
            fn_kwargs={"split_dirs": dirs, "indices": picks, "read_node": read_node, "tag": len(parts) > 1},
            num_cpus=num_cpus, compute=ray.data.TaskPoolStrategy(size=_readers(nbytes, len(units), concurrency)),
            label_selector={"ray.io/node-id": node})
        ds.context.execution_options.preserve_order = True
        return ds


def _readers(nbytes: int, units: int, concurrency: int) -> int:
    """Read tasks to run at once for `nbytes` of rows in `units` blocks: one per READER_BYTES."""
    return max(1, min(concurrency, units, -(-nbytes // READER_BYTES)))


def _read_rows(batch: dict[str, np.ndarray], split_dirs: list[str], indices: list, read_node: bool = False,
               tag: bool = False) -> dict[str, np.ndarray]:
    """Ray Data UDF: copy one unit of cache rows (a slice, or a gather by index) from the memmap
    of its split (`part`: its position in split_dirs and indices)."""
    part, start, stop = int(batch["part"][0]), int(batch["start"][0]), int(batch["stop"][0])
    images = np.load(os.path.join(split_dirs[part], "images.npy"), mmap_mode="r")
    labels = np.load(os.path.join(split_dirs[part], "labels.npy"), mmap_mode="r")
    if indices[part] is None:
        out = {"image": np.array(images[start:stop]), "label": np.array(labels[start:stop])}
    else:
        rows = indices[part][start:stop]
        out = {"image": images[rows], "label": labels[rows]}
    if tag:
        out["split"] = np.full(len(out["label"]), part, dtype=np.uint8)
    if read_node:  # 28 bytes a row beside its image (12 KB at 64 px): the node this task ran on
        import ray

        node = np.frombuffer(bytes.fromhex(ray.get_runtime_context().get_node_id()), dtype=np.uint8)
        out["read_node"] = np.broadcast_to(node, (len(out["label"]), len(node))).copy()
    return out


NODE_ID_BYTES = 28  # a Ray node id: 28 bytes, 56 hex digits


def node_ids(read_node: np.ndarray) -> set[str]:
    """The node ids (hex, as ray.get_runtime_context().get_node_id() gives them) in a batch's
    `read_node` column (PreparedData.dataset(read_node=True))."""
    rows = np.unique(np.asarray(read_node, dtype=np.uint8).reshape(-1, NODE_ID_BYTES), axis=0)
    return {bytes(r).hex() for r in rows}


def cache_key(src: Source, image_size: int, decoder: str, val_fraction: float = 0.1, val_seed: int = 0) -> str:
    blob = {"version": CACHE_VERSION, "fingerprint": src.fingerprint, "image_size": image_size,
            "decoder": decoder, "columns": [src.image_column, src.label_column]}
    if not src.has_validation:  # the carving settings only matter when there is carving
        blob["carve"] = [float(val_fraction), int(val_seed)]
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def cache_path(cache_dir, src: Source, image_size: int, decoder: str, val_fraction: float = 0.1,
               val_seed: int = 0) -> Path:
    """`<cache_dir>/prepared/<name>-<size>px-<key>`. The key says what the cache holds; the name
    only helps a reader, so a cache made from a copy of the data under another name is reused."""
    key = cache_key(src, image_size, decoder, val_fraction, val_seed)
    prepared = Path(cache_dir).expanduser() / "prepared"
    for found in sorted(prepared.glob(f"*-{image_size}px-{key}")):
        if (found / "meta.json").is_file():
            return found
    name = src.root.name if looks_like_path(src.name) else src.name
    slug = re.sub(r"[^A-Za-z0-9.-]+", "_", name).strip("_")[-40:] or "data"
    return prepared / f"{slug}-{image_size}px-{key}"


def first_skip(meta: dict) -> str:
    for split, info in meta["splits"].items():
        for s in info["skipped"]:
            return f"split '{info.get('source_split', split)}' row {s['row']} (path {s['path']!r}): {s['error']}"
    return ""
