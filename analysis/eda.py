"""CLI: confirm a dataset before sweeping it: layout, columns, class balance per split, image sizes.

    python -m analysis.eda --data SOURCE [--out DIR] [--set data.config=NAME ...]

Takes SOURCE and the data.* keys exactly as a sweep does (any hub layout, builtin:<name>),
reads the source parquet directly, and parses each image's header only (no pixel decode).
A source without a validation split is reported as such, with the rows a sweep will carve.
Writes class_counts.csv, image_sizes.csv and image_sizes.png into DIR.
"""

from __future__ import annotations

import argparse
import io
from collections import Counter
from pathlib import Path

from raysweep.config import DataConfig, add_config_args, config_from_args
from raysweep.errors import RaysweepError, cli_entry

SPLITS = ("train", "validation", "test")


def image_headers(paths: list[Path], split: str, column: str = "image"):
    """One row per image: width, height, mode, format (from the header; unreadable -> 'bad')."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    rows = []
    for path in paths:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=512, columns=[column]):
            col = batch.column(0)
            datas = col.field("bytes").to_pylist() if pa.types.is_struct(col.type) else col.to_pylist()
            for data in datas:
                try:
                    with Image.open(io.BytesIO(data or b"")) as im:  # lazy: reads the header only
                        rows.append((split, im.width, im.height, im.mode, im.format))
                except Exception:
                    rows.append((split, 0, 0, "bad", "bad"))
    return pd.DataFrame(rows, columns=["split", "width", "height", "mode", "format"])


def class_counts(src, data_cfg: DataConfig | None = None):
    """Images per class and split. Without a validation split, `validation` holds the rows a
    sweep will carve from train (data.val_fraction, data.val_seed) and `train` the rest."""
    import numpy as np
    import pandas as pd

    from raysweep.data.source import read_labels
    from raysweep.data.subsets import carve_validation

    labels = {s: read_labels(src.files[s], s, src.label_column) for s in src.files}
    if not src.has_validation:
        d = data_cfg or DataConfig()
        carved = np.zeros(len(labels["train"]), bool)
        carved[carve_validation(labels["train"], d.val_fraction, d.val_seed)] = True
        labels["train"], labels["validation"] = labels["train"][~carved], labels["train"][carved]
    n = max(len(src.class_names or []), 1 + max(int(v.max()) for v in labels.values() if len(v)))
    names = list(src.class_names or []) + [str(i) for i in range(len(src.class_names or []), n)]
    table = pd.DataFrame({"label": range(n), "class_name": names})
    for s in SPLITS:
        table[s] = pd.Series(labels[s]).value_counts().reindex(range(n), fill_value=0).to_numpy()
    return table


def size_source(args) -> str:
    """Where data.image_size came from, said with every figure measured against it: without
    --config it is the default config's full-scale 227 px, whatever the data."""
    if any(o.partition("=")[0].strip() == "data.image_size" for o in args.overrides):
        return "data.image_size, from --set"
    if args.config:
        return f"data.image_size of {args.config}"
    from raysweep.config import DEFAULT_CONFIG

    return (f"data.image_size of {DEFAULT_CONFIG.parent.name}/{DEFAULT_CONFIG.name}, the default: pass the "
            "sweep's --config, or --set data.image_size=N, to measure against its size")


def plot_sizes(sizes, out: Path, image_size: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="notebook")
    ok = sizes[sizes["mode"] != "bad"]
    short = ok[["width", "height"]].min(axis=1)
    # Axes from 0 to past both the largest image and the network input, so a set of one size
    # (CIFAR's 32x32) still shows where it sits against data.image_size.
    hi = 1.1 * max(int(ok[["width", "height"]].to_numpy().max()), image_size)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.5))
    counts = ok.groupby(["width", "height"]).size().reset_index(name="images")
    sns.scatterplot(data=counts, x="width", y="height", size="images", sizes=(40, 400), alpha=0.6,
                    ax=ax1, legend="brief")
    ax1.set(xlim=(0, hi), ylim=(0, hi), title="image sizes (pixels)")
    sns.histplot(short, ax=ax2, **({"discrete": True} if short.nunique() <= 40 else {"bins": 40}))
    ax2.set_xlim(0, hi)
    for ax in (ax1, ax2):
        ax.axvline(image_size, color="crimson", ls="--", lw=1)
    ax1.axhline(image_size, color="crimson", ls="--", lw=1)
    ax2.text(image_size, ax2.get_ylim()[1] * 0.95, f" {image_size} (data.image_size)", color="crimson", va="top")
    ax2.set_xlabel("shorter side (pixels)")
    ax2.set_title(f"shorter side: images below {image_size} are upscaled")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    d = DataConfig()
    p = argparse.ArgumentParser(prog="python -m analysis.eda", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, metavar="SOURCE",
                   help=f"hub id, local directory, 'synthetic' or builtin:<name> (default: data.source "
                        f"of the config, {d.source})")
    p.add_argument("--out", default="results/eda", type=Path, metavar="DIR",
                   help="output directory (default: results/eda)")
    p.add_argument("--cache-dir", default=None, metavar="DIR",
                   help=f"where 'synthetic' is generated (default: data.cache_dir of the config, {d.cache_dir})")
    p.add_argument("--top", type=int, default=10, help="rows of the most-common-sizes table (default: 10)")
    add_config_args(p)
    return p


@cli_entry
def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    cfg = config_from_args(a, {"data.source": a.data, "data.cache_dir": a.cache_dir})
    d = cfg.data
    import pandas as pd

    from raysweep.data.source import resolve_source, synthetic_params

    src = resolve_source(d.source, d.cache_dir, synthetic_params(d), config=d.config,
                         image_column=d.image_column, label_column=d.label_column, fingerprint=False)
    a.out.mkdir(parents=True, exist_ok=True)

    counts = class_counts(src, d)
    counts.to_csv(a.out / "class_counts.csv", index=False)
    sizes = pd.concat([image_headers(src.files[s], s, src.image_column) for s in src.files], ignore_index=True)
    table = (sizes.groupby(["width", "height"]).size().sort_values(ascending=False)
             .rename("images").reset_index())
    table["share"] = (table["images"] / len(sizes)).round(4)
    table.to_csv(a.out / "image_sizes.csv", index=False)
    plot_sizes(sizes, a.out / "image_sizes.png", d.image_size)

    print(f"source: {src.name} ({src.root})")
    print(f"config: {src.config}; columns: image '{src.image_column}', label '{src.label_column}'; "
          f"splits on disk: {', '.join(src.split_names[s] for s in src.files)}")
    print(f"classes: {len(counts)}  e.g. {', '.join(counts['class_name'].head(5))}")
    if not src.has_validation:
        print(f"validation: none in the source; a sweep carves {int(counts['validation'].sum())} rows from "
              f"train ({d.val_fraction:g} of each class, data.val_seed {d.val_seed}); train below is what remains")
    for s in SPLITS:
        c = counts[s]
        balance = "balanced" if c.min() == c.max() else f"imbalance max/min = {c.max() / max(c.min(), 1):.2f}"
        carved = " (to be carved)" if s == "validation" and not src.has_validation else ""
        print(f"  {s:<11} {int(c.sum()):>7} images{carved}, per class {int(c.min())}..{int(c.max())} ({balance})")
    print(f"image sizes: {len(table)} distinct; most common:")
    for _, r in table.head(a.top).iterrows():
        print(f"  {int(r.width):>5} x {int(r.height):<5} {int(r.images):>7}  {100 * r.share:5.1f}%")
    short = sizes.loc[sizes["mode"] != "bad", ["width", "height"]].min(axis=1)
    print(f"shorter side: median {short.median():.0f}, {100 * (short < d.image_size).mean():.1f}% "
          f"below {d.image_size} ({size_source(a)})")
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
