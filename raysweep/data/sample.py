"""CLI: write a balanced sample of a hub-layout dataset, in the same layout and schema.

    python -m raysweep.data.sample SOURCE_DIR OUT_DIR --per-class train=300 test=200

Takes the first N rows of each class of each named split, in source order, so the sample
keeps the source's row order (CIFAR-10's rows stay interleaved across classes) and a
larger N gives a superset. The schema, its `huggingface` metadata included, is kept.
This is how `builtin:cifar10-sample` was made (see its README.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raysweep.data.layout import TOP, find_layout
from raysweep.data.source import read_labels
from raysweep.console import python_command
from raysweep.errors import RaysweepError, cli_entry


def first_per_class(labels: np.ndarray, n: int, split: str) -> np.ndarray:
    """Sorted rows: the first `n` rows of every class, in source order."""
    picked = []
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        if len(rows) < n:
            raise RaysweepError(f"split '{split}': class {int(c)} has {len(rows)} rows, fewer than {n}")
        picked.append(rows[:n])
    return np.sort(np.concatenate(picked))


def write_sample(source: Path, out: Path, per_class: dict[str, int]) -> dict[str, np.ndarray]:
    """Write OUT/<config>/<split>-00000-of-00001.parquet per split; returns the source rows taken."""
    layout = find_layout(Path(source), str(source))
    where = out if layout.config == TOP else out / layout.config
    where.mkdir(parents=True, exist_ok=True)
    taken = {}
    for split, n in per_class.items():
        if split not in layout.files:
            raise RaysweepError(f"--per-class {split}={n}: the source has no split '{split}' "
                                f"(it has {', '.join(layout.files)})")
        paths = layout.files[split]
        rows = first_per_class(read_labels(paths, split, layout.label_column), n, split)
        table = pa.concat_tables(pq.read_table(p) for p in paths).take(pa.array(rows))
        group = pq.ParquetFile(paths[0]).metadata.row_group(0).num_rows  # keep the source's row groups
        dest = where / f"{layout.split_names[split]}-00000-of-00001.parquet"
        tmp = dest.with_name(dest.name + ".tmp")
        pq.write_table(table, tmp, row_group_size=group)
        tmp.replace(dest)
        taken[split] = rows
    return taken


def _counts(spec: list[str]) -> dict[str, int]:
    out = {}
    for item in spec:
        split, _, n = item.partition("=")
        if not n.isdigit() or int(n) < 1:
            raise RaysweepError(f"--per-class expects SPLIT=N with N >= 1, got {item!r}")
        out[split] = int(n)
    return out


@cli_entry
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m raysweep.data.sample", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", type=Path, metavar="SOURCE_DIR", help="a dataset directory in a hub layout")
    p.add_argument("out", type=Path, metavar="OUT_DIR", help="where the sample is written")
    p.add_argument("--per-class", nargs="+", required=True, metavar="SPLIT=N",
                   help="rows per class to take from each split, e.g. train=300 test=200 (no default)")
    a = p.parse_args(argv)
    taken = write_sample(a.source, a.out, _counts(a.per_class))
    for split, rows in taken.items():
        print(f"{split}: {len(rows)} rows (source rows {rows.min()}..{rows.max()})")
    size = sum(f.stat().st_size for f in a.out.rglob("*.parquet"))
    print(f"wrote {a.out} ({size / 1e6:.2f} MB); command: "
          f"{python_command('-m', 'raysweep.data.sample', *(sys.argv[1:] if argv is None else argv))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
