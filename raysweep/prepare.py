"""CLI: decode a dataset once into the shared 227x227 uint8 cache.

    python -m raysweep.prepare --data SOURCE --cache-dir DIR [--on-bad-image fail|skip]

SOURCE is a Hugging Face dataset id, a local directory in the hub's layout, or "synthetic".
Other data settings (synthetic size, ...) come from --config / --set.
"""

from __future__ import annotations

import argparse

from raysweep.config import add_config_args, config_from_args
from raysweep.errors import cli_entry


@cli_entry
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m raysweep.prepare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, metavar="SOURCE",
                   help="hub id (e.g. timm/mini-imagenet), local directory, or 'synthetic' (default: from config)")
    p.add_argument("--cache-dir", default=None, metavar="DIR", help="where decoded caches live (default: from config)")
    p.add_argument("--on-bad-image", choices=["fail", "skip"], default=None,
                   help="a corrupt image fails the run (default) or is skipped and counted")
    p.add_argument("--image-size", type=int, default=None, metavar="N", help="output side in pixels (default 227)")
    p.add_argument("--address", default=None, help="Ray cluster to connect to (default: RAY_ADDRESS, else a local one)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_config_args(p)
    a = p.parse_args(argv)
    cfg = config_from_args(a, {"data.source": a.data, "data.cache_dir": a.cache_dir,
                               "data.on_bad_image": a.on_bad_image, "data.image_size": a.image_size})

    import ray

    from raysweep.data import prepare_from_config

    if a.address and not ray.is_initialized():
        ray.init(address=a.address, log_to_driver=False)
    prepared = prepare_from_config(cfg.data, progress=not a.quiet)
    meta = prepared.meta
    print(f"source:  {meta['source']}  ({prepared.num_classes} classes: "
          f"{', '.join(prepared.class_names[:5])}{', ...' if prepared.num_classes > 5 else ''})")
    print(f"{'split':<12}{'images':>9}{'skipped':>9}")
    for split, info in meta["splits"].items():
        print(f"{split:<12}{info['count']:>9}{len(info['skipped']):>9}")
    for split, info in meta["splits"].items():
        for s in info["skipped"]:
            print(f"skipped: split '{split}' row {s['row']} (path {s['path']!r}): {s['error']}")
    if prepared.decoded:
        print(f"decoded {prepared.decoded} images in {meta['seconds']:.1f} s ({meta['images_per_sec']:.0f} img/s)")
    else:
        print("cache reused: nothing decoded")
    print(f"cache:   {prepared.path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
