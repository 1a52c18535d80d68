"""Dispatch `python -m raysweep.bench {prepare,train} [options]` to the benchmark's `main(argv)`."""

from __future__ import annotations

import importlib
import sys

BENCHES = {"prepare": "raysweep.bench.prepare", "train": "raysweep.bench.train"}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in BENCHES:
        print(f"usage: python -m raysweep.bench {{{','.join(BENCHES)}}} [options]", file=sys.stderr)
        return 2
    # Imported lazily: each benchmark pulls in heavy dependencies of its own.
    return importlib.import_module(BENCHES[argv[0]]).main(argv[1:]) or 0


if __name__ == "__main__":
    raise SystemExit(main())
