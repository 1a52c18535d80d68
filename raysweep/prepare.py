"""CLI: decode a dataset once into the shared uint8 cache that every trial reads.

    python -m raysweep.prepare --data SOURCE [--cache-dir DIR] [--image-size N] [--on-bad-image skip]

SOURCE is a Hugging Face dataset id, a local directory in a hub layout ({config}/{split}-*.parquet,
e.g. data/ or plain_text/, or {split}-*.parquet), "synthetic", or builtin:cifar10-sample.
A source without a validation split gets one carved from train (data.val_fraction, data.val_seed).
Other data settings (data.config, data.image_column, ...) come from --config / --set.
"""

from __future__ import annotations

import argparse

from raysweep.config import DataConfig, add_config_args, config_from_args
from raysweep.sweep.ray_compat import quiet_ray_logs
from raysweep.errors import cli_entry


def build_parser() -> argparse.ArgumentParser:
    d = DataConfig()
    p = argparse.ArgumentParser(prog="python -m raysweep.prepare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, metavar="SOURCE",
                   help=f"hub id, local directory, 'synthetic' or builtin:<name> (default: data.source "
                        f"of the config, {d.source})")
    p.add_argument("--cache-dir", default=None, metavar="DIR",
                   help=f"where decoded caches live (default: data.cache_dir of the config, {d.cache_dir})")
    p.add_argument("--on-bad-image", choices=["fail", "skip"], default=None,
                   help=f"a corrupt image fails the run or is skipped and counted (default: {d.on_bad_image})")
    p.add_argument("--image-size", type=int, default=None, metavar="N",
                   help=f"output side in pixels (default: data.image_size of the config, {d.image_size})")
    p.add_argument("--address", default=None,
                   help="Ray cluster to connect to (default: RAY_ADDRESS, else a local one)")
    p.add_argument("--quiet", action="store_true", help="no progress bar (default: off)")
    add_config_args(p)
    return p


@cli_entry
def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    cfg = config_from_args(a, {"data.source": a.data, "data.cache_dir": a.cache_dir,
                               "data.on_bad_image": a.on_bad_image, "data.image_size": a.image_size})

    from raysweep.data.source import check_local_source

    check_local_source(cfg.data)  # layout problems before Ray starts
    quiet_ray_logs()  # the token notice of every Ray start is not news
    import ray

    from raysweep.data import prepare_from_config

    if a.address and not ray.is_initialized():
        ray.init(address=a.address, log_to_driver=False, logging_level="WARNING")
    prepared = prepare_from_config(cfg.data, progress=not a.quiet)
    meta = prepared.meta
    print(f"source:  {meta['source']}  (config {meta['config']}, columns {meta['columns']['image']}, "
          f"{meta['columns']['label']}; {prepared.num_classes} classes: "
          f"{', '.join(prepared.class_names[:5])}{', ...' if prepared.num_classes > 5 else ''})")
    print(f"{'split':<12}{'images':>9}{'skipped':>9}  from")
    for split, info in meta["splits"].items():
        print(f"{split:<12}{info['count']:>9}{len(info['skipped']):>9}  {info['source_split']}")
    if prepared.carved:
        c = prepared.carved
        print(f"validation: carved from {c['from']} ({c['fraction']:g} of each class, seed {c['seed']}); "
              "no training subset can hold its rows")
    for split, info in meta["splits"].items():
        for s in info["skipped"]:
            print(f"skipped: split '{info['source_split']}' row {s['row']} (path {s['path']!r}): {s['error']}")
    if prepared.decoded:
        print(f"decoded {prepared.decoded} images in {meta['seconds']:.1f} s ({meta['images_per_sec']:.0f} img/s)")
    else:
        print("cache reused: nothing decoded")
    print(f"cache:   {prepared.path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
