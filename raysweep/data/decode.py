"""The one image transform of the cache: decode to RGB, resize the shorter side, centre-crop.

`decode_units` is the Ray Data UDF that applies it to one slice of a parquet row group.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

DECODERS = ("torchvision", "pil")


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


def decode_units(batch: dict[str, np.ndarray], size: int, decoder: str, column: str) -> dict[str, np.ndarray]:
    """Ray Data UDF: read one work unit (a row-group slice; batch_size=1) and decode its images.

    Failures come back as data (ok=False, error text) so the driver can name the split, row
    and path in one line instead of surfacing a remote traceback.
    """
    if decoder == "torchvision":
        import torch

        torch.set_num_threads(1)  # parallelism comes from tasks, one per core
    square = fast_square if decoder == "torchvision" else pil_square
    file, rg, lo, hi, row0, frow0 = (batch[k][0] for k in ("file", "rg", "lo", "hi", "row0", "frow0"))
    col = pq.ParquetFile(str(file)).read_row_group(int(rg), columns=[column]).column(column)
    col = col.combine_chunks().slice(int(lo), int(hi) - int(lo))
    if pa.types.is_struct(col.type):
        datas = col.field("bytes").to_pylist()
        paths = col.field("path").to_pylist() if col.type.get_field_index("path") >= 0 else [None] * len(col)
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
            # Rows without a stored path are named by file and row within that file.
            "path": np.array([p or f"{Path(str(file)).name}#{int(frow0) + i}" for i, p in enumerate(paths)])}
