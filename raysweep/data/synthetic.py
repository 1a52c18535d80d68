"""A learnable synthetic mini-ImageNet, written in the hub's exact parquet layout and schema.

Each class has its own hue, shape and stripe texture; position, scale, colour jitter and
noise vary per image. Sizes, modes (RGB/L/CMYK JPEG, RGB/P/RGBA PNG) vary as in the real data.
"""

from __future__ import annotations

import argparse
import colorsys
import io
import json
import math
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from raysweep.errors import RaysweepError, cli_entry

SHAPES = ("circle", "square", "triangle", "cross", "ring", "diamond", "star", "bar")
# The hub writes image data in row groups of about this many rows; match it so readers
# see the same layout locally as from the hub.
ROW_GROUP_SIZE = 100
# Rows 1..5 of every split get these forms, so even a tiny set exercises every decode path.
FORCED_FORMS = ("L-JPEG", "CMYK-JPEG", "RGB-PNG", "P-PNG", "RGBA-PNG")


def class_names(classes: int, seed: int) -> list[str]:
    """Sorted, unique ids shaped like WordNet ids (label i is the i-th in sorted order, as on the hub)."""
    rng = np.random.default_rng([seed, 7919])
    names: set[str] = set()
    while len(names) < classes:
        names.add(f"n{int(rng.integers(1_000_000, 15_000_000)):08d}")
    return sorted(names)


def _rgb(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=np.float32) * 255


def _polygon(shape: str, cx: float, cy: float, r: float, rot: float) -> list[tuple[float, float]]:
    k = {"triangle": 3, "diamond": 4, "square": 4, "star": 10, "bar": 4}[shape]
    pts = []
    for i in range(k):
        a = rot + 2 * math.pi * i / k + (math.pi / 4 if shape == "square" else 0)
        rr = r * (0.45 if shape == "star" and i % 2 else 1.0)
        if shape == "bar":
            a = rot + (math.pi * 0.1, math.pi * 0.9, math.pi * 1.1, math.pi * 1.9)[i]
        pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
    return pts


def render(label: int, classes: int, size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    """One RGB image of class `label`: class hue + stripe texture background, class shape on top."""
    w, h = size
    hue = label / classes + rng.normal(0, 0.015)
    # Orientation and frequency are permuted against the hue order so no cue is redundant.
    angle = math.pi * ((label * 3) % classes) / classes + rng.normal(0, 0.06)
    freq = (4.0, 7.0, 11.0)[label % 3] * rng.uniform(0.9, 1.1)
    s = min(w, h)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    wave = np.sin((xx * math.cos(angle) + yy * math.sin(angle)) * (2 * math.pi * freq / s)
                  + rng.uniform(0, 2 * math.pi))
    light, dark = _rgb(hue, rng.uniform(0.4, 0.7), rng.uniform(0.8, 1.0)), _rgb(hue, 0.9, rng.uniform(0.25, 0.45))
    t = (wave[..., None] * 0.5 + 0.5)
    img = dark + (light - dark) * t
    # The shape sits inside the central square, so a resize + centre crop always keeps it.
    mask_img = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(mask_img)
    r = s * rng.uniform(0.16, 0.3)
    cx = w / 2 + rng.uniform(-1, 1) * (s / 2 - r) * 0.7
    cy = h / 2 + rng.uniform(-1, 1) * (s / 2 - r) * 0.7
    shape = SHAPES[label % len(SHAPES)]
    rot = rng.uniform(0, 2 * math.pi) if shape in ("triangle", "star", "bar") else rng.normal(0, 0.15)
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    elif shape == "ring":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
        draw.ellipse((cx - r * 0.55, cy - r * 0.55, cx + r * 0.55, cy + r * 0.55), fill=0)
    elif shape == "cross":
        draw.rectangle((cx - r, cy - r * 0.3, cx + r, cy + r * 0.3), fill=255)
        draw.rectangle((cx - r * 0.3, cy - r, cx + r * 0.3, cy + r), fill=255)
    else:
        draw.polygon(_polygon(shape, cx, cy, r, rot), fill=255)
    mask = np.asarray(mask_img, dtype=np.float32)[..., None] / 255
    fg = _rgb(hue + 0.5, rng.uniform(0.6, 1.0), rng.uniform(0.7, 1.0))
    img = img * (1 - mask) + fg * mask
    img += rng.standard_normal(img.shape, dtype=np.float32) * 10
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


def encode(img: Image.Image, form: str, rng: np.random.Generator) -> bytes:
    """Encode an RGB image in one of the forms found in the wild ("RGB-JPEG", "P-PNG", ...)."""
    mode, fmt = form.split("-")
    if mode == "RGBA":
        alpha = Image.linear_gradient("L").resize(img.size)
        img = img.convert("RGBA")
        img.putalpha(alpha)
    elif mode == "P":
        img = img.quantize(colors=64)
    elif mode != "RGB":
        img = img.convert(mode)
    buf = io.BytesIO()
    if fmt == "JPEG":
        img.save(buf, "JPEG", quality=int(rng.integers(75, 96)))
    else:
        img.save(buf, "PNG", compress_level=1)
    return buf.getvalue()


def _form(row: int, rng: np.random.Generator) -> str:
    if 1 <= row <= len(FORCED_FORMS):
        return FORCED_FORMS[row - 1]
    u = rng.uniform()
    return "L-JPEG" if u < 0.05 else "RGB-PNG" if u < 0.07 else "RGB-JPEG"


def _size(rng: np.random.Generator, sizes: tuple[int, int]) -> tuple[int, int]:
    """Mostly ImageNet-like (long side 500, common aspect ratios), otherwise anything in `sizes`."""
    if rng.uniform() < 0.6:
        w, h = sizes[1], int(rng.choice([375, 375, 375, 333, 400, 281, 500])) * sizes[1] // 500
        return (w, h) if rng.uniform() < 0.75 else (h, w)
    return tuple(int(v) for v in rng.integers(sizes[0], sizes[1] + 1, size=2))


def synthetic_rows(labels: np.ndarray, classes: int, names: list[str], seed: int,
                   size: tuple[int, int] | None = None, sizes: tuple[int, int] = (120, 500),
                   forms: bool = True) -> Iterator[tuple[bytes, str, int]]:
    """Yield (encoded bytes, path, label) per label; `size` fixes (w, h), else each side in `sizes`."""
    rng = np.random.default_rng(seed)
    for row, label in enumerate(labels):
        wh = size or _size(rng, sizes)
        form = _form(row, rng) if forms else "RGB-JPEG"
        data = encode(render(int(label), classes, wh, rng), form, rng)
        ext = "JPEG" if form.endswith("JPEG") else "png"
        yield data, f"{names[label]}_{row:05d}.{ext}", int(label)


def hub_schema(names: list[str], image_column: str = "image", label_column: str = "label") -> pa.Schema:
    """The hub's parquet schema for an image-classification set, ClassLabel names included.

    The defaults are timm/mini-imagenet's columns; uoft-cs/cifar10 names its image column `img`.
    """
    features = {image_column: {"_type": "Image"}, label_column: {"names": list(names), "_type": "ClassLabel"}}
    return pa.schema(
        [(image_column, pa.struct([("bytes", pa.binary()), ("path", pa.string())])), (label_column, pa.int64())],
        metadata={b"huggingface": json.dumps({"info": {"features": features}}).encode()},
    )


def write_split(path: Path, rows, names: list[str], image_column: str = "image", label_column: str = "label") -> int:
    """Write (bytes, path, label) rows to one hub-schema parquet file, streaming by row group."""
    schema = hub_schema(names, image_column, label_column)
    n = 0
    tmp = path.with_name(path.name + ".tmp")
    with pq.ParquetWriter(tmp, schema) as writer:
        chunk: list[tuple[bytes, str, int]] = []
        for item in [*rows, None]:
            if item is not None:
                chunk.append(item)
            if chunk and (item is None or len(chunk) == ROW_GROUP_SIZE):
                data, paths, labels = zip(*chunk)
                image = pa.StructArray.from_arrays(
                    [pa.array(data, pa.binary()), pa.array(paths, pa.string())], ["bytes", "path"])
                writer.write_table(pa.table([image, pa.array(labels, pa.int64())], schema=schema))
                n += len(chunk)
                chunk = []
    tmp.replace(path)
    return n


def write_synthetic(out_dir, classes: int = 10, train_per_class: int = 40, val_per_class: int = 10,
                    test_per_class: int = 10, seed: int = 0, *, folder: str = "data",
                    image_column: str = "image", label_column: str = "label",
                    size: tuple[int, int] | None = None) -> Path:
    """Write OUT_DIR/FOLDER/{train,validation,test}-00000-of-00001.parquet; returns OUT_DIR.

    FOLDER is the hub's config folder ("data", "plain_text", or "" for the top level);
    val_per_class=0 writes no validation split (as uoft-cs/cifar10 has none); `size` fixes
    every image's (w, h) and its form to RGB JPEG (small, fast fixtures).
    """
    for key, value in {"classes": classes, "train_per_class": train_per_class,
                       "test_per_class": test_per_class}.items():
        if value < 1:
            raise RaysweepError(f"synthetic: {key} must be >= 1, got {value}")
    if val_per_class < 0:
        raise RaysweepError(f"synthetic: val_per_class must be >= 0, got {val_per_class}")
    out = Path(out_dir).expanduser()
    where = out / folder if folder else out
    where.mkdir(parents=True, exist_ok=True)
    names = class_names(classes, seed)
    per_class = {"train": train_per_class, "validation": val_per_class, "test": test_per_class}
    for i, (split, n) in enumerate(per_class.items()):
        if n == 0:
            continue
        split_seed = int(np.random.SeedSequence([seed, i]).generate_state(1)[0])
        # Rows are shuffled, as on the hub, so nothing downstream may rely on class order.
        labels = np.random.default_rng(split_seed).permutation(np.repeat(np.arange(classes), n))
        rows = synthetic_rows(labels, classes, names, split_seed, size=size, forms=size is None)
        write_split(where / f"{split}-00000-of-00001.parquet", rows, names, image_column, label_column)
    return out


@cli_entry
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m raysweep.data.synthetic", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("out_dir", metavar="OUT_DIR")
    p.add_argument("--classes", type=int, default=10, help="number of classes")
    p.add_argument("--train-per-class", type=int, default=40, help="training images per class")
    p.add_argument("--val-per-class", type=int, default=10, help="0 writes no validation split")
    p.add_argument("--test-per-class", type=int, default=10, help="test images per class")
    p.add_argument("--seed", type=int, default=0, help="seed of the classes and images")
    p.add_argument("--folder", default="data", help="config folder of the files ('' = the top level)")
    p.add_argument("--image-column", default="image", help="name of the image column")
    a = p.parse_args(argv)
    out = write_synthetic(a.out_dir, a.classes, a.train_per_class, a.val_per_class, a.test_per_class, a.seed,
                          folder=a.folder, image_column=a.image_column)
    for f in sorted((out / a.folder).glob("*.parquet")):
        print(f"{f}  {pq.ParquetFile(f).metadata.num_rows} rows")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
