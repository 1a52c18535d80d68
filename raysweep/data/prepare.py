"""Decode every image once, with Ray Data, into the uint8 cache that all trials share.

The cache (`raysweep.data.cache`) is one directory per (source fingerprint, columns,
preprocessing and carving settings), written to a temporary directory and renamed into
place, so a crash never leaves a cache that is trusted. A source without a validation split
gets one carved from train here (`carve_validation`); each decoded row goes straight to its
cache split, so `train` never holds a carved row and no image is copied twice.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raysweep.data.cache import CACHE_VERSION, PreparedData, cache_path, first_skip
from raysweep.data.decode import DECODERS, decode_units
from raysweep.data.source import SPLITS, Source, check_label_range, read_labels, resolve_source, synthetic_params
from raysweep.data.subsets import carve_validation
from raysweep.errors import RaysweepError

# A decode task handles one parquet row group (the hub writes ~100-1000 rows per group), or a
# slice of at most this many rows of a bigger group, so both cores stay busy on any layout.
MAX_UNIT_ROWS = 256
# decoder="auto": at or below this side (source image and output), PIL decodes about as fast
# as torchvision (both ~3-7k img/s per core) and spares every Ray worker the torch import,
# which costs seconds on a small machine; above it torchvision is 2-3x faster per image.
SMALL_SIDE = 64


def prepare(source: str, cache_dir, on_bad_image: str = "fail", image_size: int = 227,
            synthetic: dict | None = None, progress: bool = True, decoder: str = "auto", *,
            config: str = "", image_column: str = "", label_column: str = "",
            val_fraction: float = 0.1, val_seed: int = 0) -> PreparedData:
    """Decode SOURCE once into the shared cache (or reuse it) and return a `PreparedData`.

    `config`, `image_column`, `label_column`, `val_fraction` and `val_seed` are the data.*
    keys of the same names; the last two only act on a source without a validation split.
    `decoder` is "torchvision", "pil" or "auto" (see SMALL_SIDE).
    """
    if on_bad_image not in ("fail", "skip"):
        raise RaysweepError(f"on_bad_image must be 'fail' or 'skip', got {on_bad_image!r}")
    if decoder not in (*DECODERS, "auto"):
        raise RaysweepError(f"decoder must be auto, {' or '.join(DECODERS)}, got {decoder!r}")
    if int(image_size) < 1:
        raise RaysweepError(f"image_size must be >= 1, got {image_size}")
    if not 0.0 < float(val_fraction) < 1.0:
        raise RaysweepError(f"data.val_fraction must be in (0, 1), got {val_fraction}")
    # Absolute, because trials read the cache from processes with another working directory.
    cache_dir = Path(cache_dir).expanduser().resolve()
    src = resolve_source(source, cache_dir, synthetic, config=config, image_column=image_column,
                         label_column=label_column)
    if decoder == "auto":
        decoder = choose_decoder(src, int(image_size))
    final = cache_path(cache_dir, src, int(image_size), decoder, val_fraction, val_seed)
    if (final / "meta.json").is_file():
        prepared = PreparedData(final)
        if on_bad_image == "fail" and prepared.skipped:
            raise RaysweepError(f"bad image in {first_skip(prepared.meta)} (the cache at {final} skipped "
                                f"{prepared.skipped}; pass --on-bad-image skip to use it)")
        return prepared
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_temps(final)
    tmp = final.with_name(f".tmp-{final.name}-{socket.gethostname()}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        meta = _build(src, tmp, int(image_size), on_bad_image, decoder, progress,
                      (float(val_fraction), int(val_seed)))
        try:
            os.rename(tmp, final)
        except OSError:  # a concurrent run finished first; its cache is equivalent
            shutil.rmtree(tmp, ignore_errors=True)
            return PreparedData(final, decoded=meta["decoded"])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return PreparedData(final, meta, decoded=meta["decoded"])


def prepare_from_config(data_cfg, progress: bool = True) -> PreparedData:
    """`prepare` with every setting of a `raysweep.config.DataConfig`."""
    return prepare(data_cfg.source, data_cfg.cache_dir, on_bad_image=data_cfg.on_bad_image,
                   image_size=data_cfg.image_size, synthetic=synthetic_params(data_cfg), progress=progress,
                   config=data_cfg.config, image_column=data_cfg.image_column,
                   label_column=data_cfg.label_column, val_fraction=data_cfg.val_fraction,
                   val_seed=data_cfg.val_seed)


def choose_decoder(src: Source, image_size: int) -> str:
    """"pil" for small images into a small output (from the first training image), else "torchvision"."""
    if image_size > SMALL_SIDE:
        return "torchvision"
    from PIL import Image

    batch = next(pq.ParquetFile(src.files["train"][0]).iter_batches(batch_size=1, columns=[src.image_column]), None)
    if batch is None or batch.num_rows == 0:  # an empty split is reported by the build
        return "torchvision"
    col = batch.column(0)
    data = (col.field("bytes") if pa.types.is_struct(col.type) else col)[0].as_py()
    try:
        with Image.open(io.BytesIO(data or b"")) as im:  # the header only
            small = min(im.size) <= SMALL_SIDE
    except Exception:  # a bad first image is reported by the decode itself
        small = False
    return "pil" if small else "torchvision"


@contextlib.contextmanager
def quiet_ray_data():
    """Ray Data's console INFO lines (plans, "execution finished") off while the cache is built:
    raysweep's Progress is the one display. Its warnings and errors still show, and its log
    file (ray-data.log) keeps everything."""
    import logging

    logger = logging.getLogger("ray.data")
    level = logger.level
    logger.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        logger.setLevel(level)


def _remove_dead_temps(final: Path) -> None:
    """Drop temp dirs left by crashed runs on this host (their pid is gone)."""
    prefix = f".tmp-{final.name}-{socket.gethostname()}-"
    for d in final.parent.glob(prefix + "*"):
        pid = d.name[len(prefix):]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(d, ignore_errors=True)


def _work_units(split: str, paths: list[Path]) -> list[dict[str, Any]]:
    units, row = [], 0
    for p in paths:
        md, frow = pq.ParquetFile(p).metadata, 0
        for rg in range(md.num_row_groups):
            n = md.row_group(rg).num_rows
            for lo in range(0, n, MAX_UNIT_ROWS):
                hi = min(n, lo + MAX_UNIT_ROWS)
                units.append({"split": split, "file": str(p), "rg": rg, "lo": lo, "hi": hi,
                              "row0": row + lo, "frow0": frow + lo})
            row, frow = row + n, frow + n
    return units


def _routes(src: Source, labels: dict[str, np.ndarray], carve: tuple[float, int]):
    """Where each source row goes: {source split: (cache split index, cache row) per row}.

    Also returns, per cache split, its source split and source rows, and the carving record.
    """
    routes, origin = {}, {}
    for s, lab in labels.items():
        routes[s] = (np.full(len(lab), SPLITS.index(s), np.int8), np.arange(len(lab), dtype=np.int64))
        origin[s] = (s, np.arange(len(lab), dtype=np.int64))
    carved = None
    if not src.has_validation:
        fraction, seed = carve
        val = carve_validation(labels["train"], fraction, seed)
        rest = np.setdiff1d(np.arange(len(labels["train"])), val)
        dest, row = routes["train"]
        dest[val], row[val] = SPLITS.index("validation"), np.arange(len(val))
        row[rest] = np.arange(len(rest))
        origin["train"], origin["validation"] = ("train", rest), ("train", val)
        carved = {"from": "train", "fraction": fraction, "seed": seed, "rows": val.tolist()}
    return routes, origin, carved


def _build(src: Source, tmp: Path, size: int, on_bad_image: str, decoder: str, progress: bool,
           carve: tuple[float, int]) -> dict:
    import ray

    from raysweep.console import Progress

    col = src.label_column
    labels = {s: read_labels(paths, s, col) for s, paths in src.files.items()}
    names = src.class_names
    if names is None:  # no ClassLabel metadata: classes are the label values 0..max
        names = [str(i) for i in range(int(max(int(v.max()) for v in labels.values() if len(v))) + 1)]
    for s, paths in src.files.items():
        if len(labels[s]) == 0:
            raise RaysweepError(f"split '{s}' is empty ({', '.join(str(p) for p in paths)})")
        check_label_range(s, paths, labels[s], len(names), col)
    units = [u for s, paths in src.files.items() for u in _work_units(s, paths)]
    if sum(u["hi"] - u["lo"] for u in units) != sum(len(v) for v in labels.values()):
        raise RaysweepError(f"data source '{src.name}': row-group metadata disagrees with the row counts")
    routes, origin, carved = _routes(src, labels, carve)

    total = sum(len(v) for v in labels.values())
    need, free = total * size * size * 3, shutil.disk_usage(tmp.parent).free
    if need > free:
        raise RaysweepError(f"cache dir {tmp.parent}: the decoded images need {need / 1e9:.1f} GB, "
                            f"only {free / 1e9:.1f} GB free")
    if not ray.is_initialized():
        ray.init(logging_level="WARNING", log_to_driver=False)
    images, seen = {}, {}
    for s in SPLITS:
        (tmp / s).mkdir(parents=True)
        n = len(origin[s][1])
        images[s] = np.lib.format.open_memmap(tmp / s / "images.npy", "w+", np.uint8, (n, size, size, 3))
        seen[s] = np.zeros(n, bool)
    ds = ray.data.from_items(units, override_num_blocks=len(units)).map_batches(
        decode_units, batch_size=1, fn_kwargs={"size": size, "decoder": decoder, "column": src.image_column},
        num_cpus=1)
    ctx = ds.context
    # The per-operator reservation starts each run with a budget of one task until the
    # autoscaling coordinator answers (~1-2 s); this one-operator pipeline needs no reservation.
    ctx.op_resource_reservation_enabled = False
    ctx.enable_progress_bars = False  # raysweep.console.Progress is the one display
    ctx.print_on_execution_start = False
    bar = Progress(total, "decoding", unit="img", enabled=progress)
    bar.write(f"raysweep: decoding {total} images from {src.name} to {size}x{size} RGB "
              f"({len(units)} Ray Data tasks, decoder {decoder})"
              + (f"; validation: {len(carved['rows'])} rows carved from train" if carved else ""))
    t0 = time.perf_counter()
    try:
        with quiet_ray_data():
            skipped = _drain(ds, images, seen, routes, on_bad_image, bar)
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    for s in SPLITS:
        if not seen[s].all():
            raise RaysweepError(f"split '{s}': {int((~seen[s]).sum())} rows never came back from the pipeline")
    splits_meta = {}
    for s in SPLITS:
        from_split, rows = origin[s]
        keep = np.ones(len(rows), bool)
        keep[routes[from_split][1][[k["row"] for k in skipped[s]]]] = False
        if not keep.any():
            raise RaysweepError(f"split '{s}': every image was bad ({len(keep)} skipped)")
        images[s].flush()  # msync: the pixels are on disk before the directory is renamed
        if not keep.all():
            _compact(tmp / s / "images.npy", images[s], keep)
        del images[s]
        _save(tmp / s / "labels.npy", labels[from_split][rows][keep])
        _save(tmp / s / "rows.npy", rows[keep])
        splits_meta[s] = {"count": int(keep.sum()), "source_split": src.split_names.get(from_split, from_split),
                          "source_rows": len(keep), "skipped": skipped[s],
                          "files": [str(p) for p in src.files[from_split]]}
    n_skipped = sum(len(v) for v in skipped.values())
    meta = {"version": CACHE_VERSION, "source": src.name, "source_root": str(src.root), "config": src.config,
            "columns": {"image": src.image_column, "label": src.label_column},
            "fingerprint": src.fingerprint, "image_size": size, "decoder": decoder,
            "class_names": names, "num_classes": len(names), "splits": splits_meta, "carved": carved,
            "skipped": n_skipped, "decoded": total, "seconds": round(seconds, 3),
            "images_per_sec": round(total / seconds, 1) if seconds else None,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "on_bad_image": on_bad_image}
    with open(tmp / "meta.json", "w") as f:  # last: a directory without it is not a cache
        f.write(json.dumps(meta, indent=1))
        f.flush()
        os.fsync(f.fileno())
    if progress and n_skipped:
        print(f"raysweep: skipped {n_skipped} bad image(s); first: {first_skip(meta)}", flush=True)
    return meta


def _drain(ds, images: dict, seen: dict, routes: dict, on_bad_image: str, bar) -> dict[str, list[dict]]:
    """Write each decoded block straight into its cache split's memmap; handle bad images.

    Skipped images are recorded under their cache split, by their row in the source split.
    """
    skipped: dict[str, list[dict]] = {s: [] for s in images}
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=4):
        for s in np.unique(batch["split"]):
            sel = batch["split"] == s
            rows, paths, errors, pixels = batch["row"][sel], batch["path"][sel], batch["error"][sel], batch["image"][sel]
            dest, dest_rows = routes[s][0][rows], routes[s][1][rows]
            for b in np.flatnonzero(~batch["ok"][sel]):
                if on_bad_image == "fail":
                    raise RaysweepError(f"bad image in split '{s}' row {int(rows[b])} (path {str(paths[b])!r}): "
                                        f"{errors[b]} (pass --on-bad-image skip to skip such images)")
                skipped[SPLITS[dest[b]]].append({"row": int(rows[b]), "path": str(paths[b]), "error": str(errors[b])})
            for d in np.unique(dest):
                to = SPLITS[d]
                m = dest == d
                r = dest_rows[m]
                if r[-1] - r[0] == len(r) - 1:  # one contiguous run: a plain slice copy
                    images[to][r[0]:r[-1] + 1] = pixels[m]
                else:
                    images[to][r] = pixels[m]
                seen[to][r] = True
        bar.update(len(batch["row"]))
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
