"""Decode every image once, with Ray Data, into a 227x227 uint8 cache that all trials share.

The cache is one directory per (source fingerprint, preprocessing settings), written to a
temporary directory and renamed into place, so a crash never leaves a cache that is trusted.
Layout: meta.json, and per split `images.npy` (N, S, S, 3) uint8, `labels.npy` (N,) int64 and
`rows.npy` (N,) int64 (the source row of each cache row; differs from 0..N-1 only after skips).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import socket
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raysweep.data.source import SPLITS, Source, read_labels, resolve_source
from raysweep.errors import RaysweepError

CACHE_VERSION = 1
DECODERS = ("torchvision", "pil")
# A decode task handles one parquet row group (the hub writes ~100 rows per group), or a
# slice of at most this many rows of a bigger group, so both cores stay busy on any layout.
MAX_UNIT_ROWS = 256


# --- the transform: decode to RGB, resize the shorter side to `size`, centre-crop -----------

def _resize_box(w: int, h: int, size: int) -> tuple[int, int, int, int]:
    """(new_w, new_h, left, top): shorter side to `size`, rounded, then a centred size x size crop."""
    s = size / min(w, h)
    nw, nh = max(size, round(w * s)), max(size, round(h * s))
    return nw, nh, (nw - size) // 2, (nh - size) // 2


def pil_square(data: bytes, size: int = 227) -> np.ndarray:
    """The plain PIL recipe (decode to RGB, bilinear resize, centre crop): size x size x 3 uint8."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("RGB")
        nw, nh, left, top = _resize_box(*im.size, size)
        im = im.resize((nw, nh), Image.BILINEAR)
        return np.asarray(im.crop((left, top, left + size, top + size)))


def fast_square(data: bytes, size: int = 227) -> np.ndarray:
    """Same result as `pil_square` (within 1 grey level), about 2x faster per core.

    torchvision's libjpeg-turbo/libpng decoders give PIL's exact pixels for JPEG (RGB, L,
    CMYK) and PNG (RGB, P, RGBA); torch's antialiased bilinear resize matches PIL's once the
    target size is rounded the same way. Anything torchvision cannot read goes through PIL.
    """
    import torch
    import torchvision.transforms.v2.functional as TF
    from torchvision.io import ImageReadMode, decode_image

    try:
        x = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except Exception:
        from PIL import Image

        with Image.open(io.BytesIO(data)) as im:  # raises for corrupt or truncated data
            x = torch.from_numpy(np.asarray(im.convert("RGB"))).permute(2, 0, 1)
    nw, nh, left, top = _resize_box(x.shape[-1], x.shape[-2], size)
    x = TF.resize(x, [nh, nw], antialias=True)[:, top:top + size, left:left + size]
    return x.permute(1, 2, 0).numpy()


def _decode_units(batch: dict[str, np.ndarray], size: int, decoder: str) -> dict[str, np.ndarray]:
    """Ray Data UDF: read one work unit (a row-group slice; batch_size=1) and decode its images.

    Failures come back as data (ok=False, error text) so the driver can name the split, row
    and path in one line instead of surfacing a remote traceback.
    """
    if decoder == "torchvision":
        import torch

        torch.set_num_threads(1)  # parallelism comes from tasks, one per core
    square = fast_square if decoder == "torchvision" else pil_square
    file, rg, lo, hi, row0 = (batch[k][0] for k in ("file", "rg", "lo", "hi", "row0"))
    col = pq.ParquetFile(str(file)).read_row_group(int(rg), columns=["image"]).column("image")
    col = col.combine_chunks().slice(int(lo), int(hi) - int(lo))
    if pa.types.is_struct(col.type):
        datas, paths = col.field("bytes").to_pylist(), col.field("path").to_pylist()
    else:
        datas, paths = col.to_pylist(), [None] * len(col)
    rows = np.arange(int(row0), int(row0) + len(datas), dtype=np.int64)
    images = np.zeros((len(datas), size, size, 3), np.uint8)
    errors = []
    for i, data in enumerate(datas):
        try:
            if not data:
                raise ValueError("the row holds no image bytes")
            images[i] = square(data, size)
            errors.append("")
        except Exception as e:  # any decoder error means a bad image; the driver decides
            errors.append(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".strip())
    return {"split": np.full(len(rows), batch["split"][0]), "row": rows, "image": images,
            "ok": np.array([not e for e in errors], bool), "error": np.array(errors),
            "path": np.array([p or f"{Path(str(file)).name}#{r}" for p, r in zip(paths, rows)])}


# --- the cache --------------------------------------------------------------------------

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

    def _split_dir(self, split: str) -> Path:
        if split not in self.meta["splits"]:
            raise RaysweepError(f"unknown split '{split}' (prepared splits: {', '.join(self.meta['splits'])})")
        return self.path / split

    def labels(self, split: str) -> np.ndarray:
        return np.load(self._split_dir(split) / "labels.npy")

    def source_rows(self, split: str) -> np.ndarray:
        """Row index in the source split of each cache row (identity unless images were skipped)."""
        return np.load(self._split_dir(split) / "rows.npy")

    def images(self, split: str) -> np.ndarray:
        """The split's images as a read-only memory map (N, S, S, 3) uint8, for local use."""
        return np.load(self._split_dir(split) / "images.npy", mmap_mode="r")

    def dataset(self, split: str, indices=None, *, block_rows: int = 256, num_cpus: float = 0,
                concurrency: int = 2):
        """A Ray Dataset with `image` (S, S, 3) uint8 and `label` int64, in cache row order.

        `indices` (e.g. a stratified subset) selects rows; they are read directly from the
        memory-mapped cache, so a small subset costs only its own bytes. Read tasks are pinned
        to this node, which is where the cache is known to exist, and reserve no CPU by default
        (they copy pages, and must not starve trials that hold every core); at most
        `concurrency` run at once.
        """
        import ray

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
        units = [{"start": a, "stop": min(a + block_rows, total)} for a in range(0, total, block_rows)]
        if not ray.is_initialized():
            ray.init()
        node = ray.get_runtime_context().get_node_id()
        ds = ray.data.from_items(units, override_num_blocks=len(units)).map_batches(
            _read_rows, batch_size=1, fn_kwargs={"split_dir": str(d), "indices": idx},
            num_cpus=num_cpus, compute=ray.data.TaskPoolStrategy(size=min(concurrency, len(units))),
            label_selector={"ray.io/node-id": node})
        ds.context.execution_options.preserve_order = True
        return ds


def _read_rows(batch: dict[str, np.ndarray], split_dir: str, indices: np.ndarray | None) -> dict[str, np.ndarray]:
    """Ray Data UDF: copy one block of cache rows (a slice, or a gather by index) from the memmap."""
    images = np.load(os.path.join(split_dir, "images.npy"), mmap_mode="r")
    labels = np.load(os.path.join(split_dir, "labels.npy"), mmap_mode="r")
    start, stop = int(batch["start"][0]), int(batch["stop"][0])
    if indices is None:
        return {"image": np.array(images[start:stop]), "label": np.array(labels[start:stop])}
    rows = indices[start:stop]
    return {"image": images[rows], "label": labels[rows]}


def cache_key(src: Source, image_size: int, decoder: str) -> str:
    blob = json.dumps({"version": CACHE_VERSION, "fingerprint": src.fingerprint,
                       "image_size": image_size, "decoder": decoder}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cache_path(cache_dir, src: Source, image_size: int, decoder: str) -> Path:
    slug = re.sub(r"[^A-Za-z0-9.-]+", "_", src.name.strip("./~")).strip("_")[-40:] or "data"
    return Path(cache_dir).expanduser() / "prepared" / f"{slug}-{image_size}px-{cache_key(src, image_size, decoder)}"


def _first_skip(meta: dict) -> str:
    for split, info in meta["splits"].items():
        for s in info["skipped"]:
            return f"split '{split}' row {s['row']} (path {s['path']!r}): {s['error']}"
    return ""


# --- building it ------------------------------------------------------------------------

def prepare(source: str, cache_dir, on_bad_image: str = "fail", image_size: int = 227,
            synthetic: dict | None = None, progress: bool = True, decoder: str = "torchvision") -> PreparedData:
    """Decode SOURCE once into the shared cache (or reuse it) and return a `PreparedData`."""
    if on_bad_image not in ("fail", "skip"):
        raise RaysweepError(f"on_bad_image must be 'fail' or 'skip', got {on_bad_image!r}")
    if decoder not in DECODERS:
        raise RaysweepError(f"decoder must be one of {', '.join(DECODERS)}, got {decoder!r}")
    if int(image_size) < 1:
        raise RaysweepError(f"image_size must be >= 1, got {image_size}")
    # Absolute, because trials read the cache from processes with another working directory.
    cache_dir = Path(cache_dir).expanduser().resolve()
    src = resolve_source(source, cache_dir, synthetic)
    final = cache_path(cache_dir, src, int(image_size), decoder)
    if (final / "meta.json").is_file():
        prepared = PreparedData(final)
        if on_bad_image == "fail" and prepared.skipped:
            raise RaysweepError(f"bad image in {_first_skip(prepared.meta)} (the cache at {final} skipped "
                                f"{prepared.skipped}; pass --on-bad-image skip to use it)")
        return prepared
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_temps(final)
    tmp = final.with_name(f".tmp-{final.name}-{socket.gethostname()}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        meta = _build(src, tmp, int(image_size), on_bad_image, decoder, progress)
        try:
            os.rename(tmp, final)
        except OSError:  # a concurrent run finished first; its cache is equivalent
            shutil.rmtree(tmp, ignore_errors=True)
            return PreparedData(final, decoded=meta["decoded"])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return PreparedData(final, meta, decoded=meta["decoded"])


def prepare_from_config(data_cfg, progress: bool = True) -> PreparedData:
    """`prepare` with the settings of a `raysweep.config.DataConfig`."""
    synthetic = None
    if data_cfg.source == "synthetic":
        synthetic = {"classes": data_cfg.synthetic_classes, "train_per_class": data_cfg.synthetic_train_per_class,
                     "val_per_class": data_cfg.synthetic_val_per_class,
                     "test_per_class": data_cfg.synthetic_test_per_class, "seed": data_cfg.synthetic_seed}
    return prepare(data_cfg.source, data_cfg.cache_dir, on_bad_image=data_cfg.on_bad_image,
                   image_size=data_cfg.image_size, synthetic=synthetic, progress=progress)


def _remove_dead_temps(final: Path) -> None:
    """Drop temp dirs left by crashed runs on this host (their pid is gone)."""
    prefix = f".tmp-{final.name}-{socket.gethostname()}-"
    for d in final.parent.glob(prefix + "*"):
        pid = d.name[len(prefix):]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(d, ignore_errors=True)


def _check_split(split: str, paths: list[Path], labels: np.ndarray, num_classes: int) -> None:
    if len(labels) == 0:
        raise RaysweepError(f"split '{split}' is empty ({', '.join(str(p) for p in paths)})")
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        r = int(bad[0])
        raise RaysweepError(f"split '{split}' row {r}: label {int(labels[r])} is outside the class range "
                            f"[0, {num_classes}) ({bad.size} such rows)")


def _work_units(split: str, paths: list[Path]) -> list[dict[str, Any]]:
    units, row = [], 0
    for p in paths:
        md = pq.ParquetFile(p).metadata
        for rg in range(md.num_row_groups):
            n = md.row_group(rg).num_rows
            for lo in range(0, n, MAX_UNIT_ROWS):
                hi = min(n, lo + MAX_UNIT_ROWS)
                units.append({"split": split, "file": str(p), "rg": rg, "lo": lo, "hi": hi, "row0": row + lo})
            row += n
    return units


def _build(src: Source, tmp: Path, size: int, on_bad_image: str, decoder: str, progress: bool) -> dict:
    import ray

    labels = {s: read_labels(src.files[s], s) for s in SPLITS}
    names = src.class_names
    if names is None:  # no ClassLabel metadata: classes are the label values 0..max
        names = [str(i) for i in range(int(max(int(v.max()) for v in labels.values() if len(v))) + 1)]
    for s in SPLITS:
        _check_split(s, src.files[s], labels[s], len(names))
    units = [u for s in SPLITS for u in _work_units(s, src.files[s])]
    if sum(u["hi"] - u["lo"] for u in units) != sum(len(v) for v in labels.values()):
        raise RaysweepError(f"data source '{src.name}': row-group metadata disagrees with the row counts")

    total = sum(len(v) for v in labels.values())
    need, free = total * size * size * 3, shutil.disk_usage(tmp.parent).free
    if need > free:
        raise RaysweepError(f"cache dir {tmp.parent}: the decoded images need {need / 1e9:.1f} GB, "
                            f"only {free / 1e9:.1f} GB free")
    if not ray.is_initialized():
        ray.init()
    for s in SPLITS:
        (tmp / s).mkdir(parents=True)
    images = {s: np.lib.format.open_memmap(tmp / s / "images.npy", "w+", np.uint8, (len(labels[s]), size, size, 3))
              for s in SPLITS}
    seen = {s: np.zeros(len(labels[s]), bool) for s in SPLITS}
    if progress:
        print(f"raysweep: decoding {total} images from {src.name} to {size}x{size} RGB "
              f"({len(units)} Ray Data tasks, decoder {decoder})", flush=True)
    ds = ray.data.from_items(units, override_num_blocks=len(units)).map_batches(
        _decode_units, batch_size=1, fn_kwargs={"size": size, "decoder": decoder}, num_cpus=1)
    ctx = ds.context
    # The per-operator reservation starts each run with a budget of one task until the
    # autoscaling coordinator answers (~1-2 s); this one-operator pipeline needs no reservation.
    ctx.op_resource_reservation_enabled = False
    ctx.enable_progress_bars = progress
    ctx.print_on_execution_start = progress
    t0 = time.perf_counter()
    skipped = _drain(ds, images, seen, on_bad_image)
    seconds = time.perf_counter() - t0
    for s in SPLITS:
        if not seen[s].all():
            raise RaysweepError(f"split '{s}': {int((~seen[s]).sum())} rows never came back from the pipeline")
    splits_meta = {}
    for s in SPLITS:
        keep = np.ones(len(labels[s]), bool)
        keep[[k["row"] for k in skipped[s]]] = False
        if not keep.any():
            raise RaysweepError(f"split '{s}': every image was bad ({len(keep)} skipped)")
        images[s].flush()  # msync: the pixels are on disk before the directory is renamed
        if not keep.all():
            _compact(tmp / s / "images.npy", images[s], keep)
        del images[s]
        _save(tmp / s / "labels.npy", labels[s][keep])
        _save(tmp / s / "rows.npy", np.flatnonzero(keep).astype(np.int64))
        splits_meta[s] = {"count": int(keep.sum()), "source_rows": len(keep), "skipped": skipped[s],
                          "files": [str(p) for p in src.files[s]]}
    n_skipped = sum(len(v) for v in skipped.values())
    meta = {"version": CACHE_VERSION, "source": src.name, "source_root": str(src.root),
            "fingerprint": src.fingerprint, "image_size": size, "decoder": decoder,
            "class_names": names, "num_classes": len(names), "splits": splits_meta,
            "skipped": n_skipped, "decoded": total, "seconds": round(seconds, 3),
            "images_per_sec": round(total / seconds, 1) if seconds else None,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "on_bad_image": on_bad_image}
    with open(tmp / "meta.json", "w") as f:  # last: a directory without it is not a cache
        f.write(json.dumps(meta, indent=1))
        f.flush()
        os.fsync(f.fileno())
    if progress and n_skipped:
        print(f"raysweep: skipped {n_skipped} bad image(s); first: {_first_skip(meta)}", flush=True)
    return meta


def _drain(ds, images: dict, seen: dict, on_bad_image: str) -> dict[str, list[dict]]:
    """Write each decoded block into its split's memmap at its source rows; handle bad images."""
    skipped: dict[str, list[dict]] = {s: [] for s in images}
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=4):
        for s in np.unique(batch["split"]):
            sel = batch["split"] == s
            rows, paths, errors = batch["row"][sel], batch["path"][sel], batch["error"][sel]
            for b in np.flatnonzero(~batch["ok"][sel]):
                if on_bad_image == "fail":
                    raise RaysweepError(f"bad image in split '{s}' row {int(rows[b])} (path {str(paths[b])!r}): "
                                        f"{errors[b]} (pass --on-bad-image skip to skip such images)")
                skipped[s].append({"row": int(rows[b]), "path": str(paths[b]), "error": str(errors[b])})
            if rows[-1] - rows[0] == len(rows) - 1:  # one contiguous run: a plain slice copy
                images[s][rows[0]:rows[-1] + 1] = batch["image"][sel]
            else:
                images[s][rows] = batch["image"][sel]
            seen[s][rows] = True
    return skipped


def _save(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, array)
        f.flush()
        os.fsync(f.fileno())


def _compact(path: Path, full: np.ndarray, keep: np.ndarray) -> None:
    """Rewrite images.npy without the skipped rows, streaming in chunks."""
    out_path = path.with_name("images.compact.npy")
    out = np.lib.format.open_memmap(out_path, "w+", np.uint8, (int(keep.sum()), *full.shape[1:]))
    rows = np.flatnonzero(keep)
    for a in range(0, len(rows), 512):
        out[a:a + 512] = full[rows[a:a + 512]]
    out.flush()
    del out
    os.replace(out_path, path)
