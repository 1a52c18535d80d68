"""`python -m raysweep.bench {prepare,train,overhead,gpu} [options]`: benchmarks that print ratios
measured side by side in one run; each one's last line is a JSON object."""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module with main(argv), one line on what it measures). Imported lazily: each pulls in
# heavy dependencies of its own, and `--help` must answer at once.
BENCHES = {
    "prepare": ("raysweep.bench.prepare", "decoding into the cache: raysweep's Ray Data prepare vs a one-process PIL loop"),
    "train": ("raysweep.bench.train", "the trial loop's training speed vs the bare model on one batch, outside Ray"),
    "overhead": ("raysweep.bench.overhead", "a real sweep through Tune and Train: per-epoch overhead, checkpoint "
                                            "cost, time to first step, in-trial vs outside-Ray img/s"),
    "gpu": ("raysweep.bench.gpu", "the first-GPU acceptance run: speeds, memory, packing, sweep overhead (needs CUDA)"),
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m raysweep.bench", description=__doc__,
        epilog="`python -m raysweep.bench BENCH --help` shows a benchmark's options and defaults.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bench", choices=list(BENCHES), metavar="BENCH",
                   help="; ".join(f"{name}: {what}" for name, (_, what) in BENCHES.items()))
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in BENCHES:
        # --help (exit 0), or no/unknown benchmark (one usage error, exit 2).
        _parser().parse_args(argv[:1] or [])
        return 2
    return importlib.import_module(BENCHES[argv[0]][0]).main(argv[1:]) or 0


if __name__ == "__main__":
    raise SystemExit(main())
