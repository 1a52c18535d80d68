"""CLI: confirm a dataset before sweeping it: class balance per split, image sizes and modes.

    python -m analysis.eda --data SOURCE [--out DIR]

Reads the source parquet directly; PIL parses each image's header only (no pixel decode).
Writes class_counts.csv, image_sizes.csv and image_sizes.png into DIR.
"""

from __future__ import annotations

import argparse
import io
from collections import Counter
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from raysweep.data.source import SPLITS, read_labels, resolve_source
from raysweep.errors import RaysweepError, cli_entry


def image_headers(paths: list[Path], split: str) -> pd.DataFrame:
    """One row per image: width, height, mode, format (from the header; unreadable -> 'bad')."""
    from PIL import Image

    rows = []
    for path in paths:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=512, columns=["image"]):
            col = batch.column(0)
            datas = col.field("bytes").to_pylist() if pa.types.is_struct(col.type) else col.to_pylist()
            for data in datas:
                try:
                    with Image.open(io.BytesIO(data or b"")) as im:  # lazy: reads the header only
                        rows.append((split, im.width, im.height, im.mode, im.format))
                except Exception:
                    rows.append((split, 0, 0, "bad", "bad"))
    return pd.DataFrame(rows, columns=["split", "width", "height", "mode", "format"])


def class_counts(src) -> pd.DataFrame:
    labels = {s: read_labels(src.files[s], s) for s in SPLITS}
    n = max(len(src.class_names or []), 1 + max(int(v.max()) for v in labels.values() if len(v)))
    names = list(src.class_names or []) + [str(i) for i in range(len(src.class_names or []), n)]
    table = pd.DataFrame({"label": range(n), "class_name": names})
    for s in SPLITS:
        table[s] = pd.Series(labels[s]).value_counts().reindex(range(n), fill_value=0).to_numpy()
    return table


def plot_sizes(sizes: pd.DataFrame, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="notebook")
    ok = sizes[sizes["mode"] != "bad"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.5))
    counts = ok.groupby(["width", "height"]).size().reset_index(name="images")
    sns.scatterplot(data=counts, x="width", y="height", size="images", sizes=(10, 400), alpha=0.6,
                    ax=ax1, legend="brief")
    ax1.set_title("image sizes (pixels)")
    sns.histplot(ok[["width", "height"]].min(axis=1), bins=40, ax=ax2)
    ax2.axvline(227, color="crimson", ls="--", lw=1)
    ax2.text(227, ax2.get_ylim()[1] * 0.95, " 227 (network input)", color="crimson", va="top")
    ax2.set_xlabel("shorter side (pixels)")
    ax2.set_title("shorter side: images below 227 are upscaled")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


@cli_entry
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m analysis.eda", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="timm/mini-imagenet", metavar="SOURCE",
                   help="hub id, local directory, or 'synthetic' (default: timm/mini-imagenet)")
    p.add_argument("--out", default="results/eda", type=Path, metavar="DIR", help="output directory")
    p.add_argument("--cache-dir", default="~/.cache/raysweep", help="where 'synthetic' is generated")
    p.add_argument("--top", type=int, default=10, help="rows of the most-common-sizes table")
    a = p.parse_args(argv)
    src = resolve_source(a.data, a.cache_dir)
    a.out.mkdir(parents=True, exist_ok=True)

    counts = class_counts(src)
    counts.to_csv(a.out / "class_counts.csv", index=False)
    sizes = pd.concat([image_headers(src.files[s], s) for s in SPLITS], ignore_index=True)
    table = (sizes.groupby(["width", "height"]).size().sort_values(ascending=False)
             .rename("images").reset_index())
    table["share"] = (table["images"] / len(sizes)).round(4)
    table.to_csv(a.out / "image_sizes.csv", index=False)
    plot_sizes(sizes, a.out / "image_sizes.png")

    print(f"source: {src.name} ({src.root})")
    print(f"classes: {len(counts)}  e.g. {', '.join(counts['class_name'].head(5))}")
    for s in SPLITS:
        c = counts[s]
        balance = "balanced" if c.min() == c.max() else f"imbalance max/min = {c.max() / max(c.min(), 1):.2f}"
        print(f"  {s:<11} {int(c.sum()):>7} images, per class {int(c.min())}..{int(c.max())} ({balance})")
    print(f"image sizes: {len(table)} distinct; most common:")
    for _, r in table.head(a.top).iterrows():
        print(f"  {int(r.width):>5} x {int(r.height):<5} {int(r.images):>7}  {100 * r.share:5.1f}%")
    short = sizes.loc[sizes["mode"] != "bad", ["width", "height"]].min(axis=1)
    print(f"shorter side: median {short.median():.0f}, {100 * (short < 227).mean():.1f}% below 227")
    modes = Counter(zip(sizes["format"], sizes["mode"]))
    print("formats/modes: " + ", ".join(f"{f} {m}: {n}" for (f, m), n in modes.most_common()))
    if (sizes["mode"] == "bad").any():
        print(f"unreadable image headers: {int((sizes['mode'] == 'bad').sum())}")
    if counts[list(SPLITS)].to_numpy().sum() == 0:
        raise RaysweepError("the dataset has no rows")
    print(f"wrote {a.out / 'class_counts.csv'}, {a.out / 'image_sizes.csv'}, {a.out / 'image_sizes.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
