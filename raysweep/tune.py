"""`python -m raysweep.tune`: the sweep's command line (it lives in raysweep.sweep.cli)."""

import sys

from raysweep.sweep.cli import build_parser, main  # noqa: F401  (the documented entry points)

if __name__ == "__main__":
    sys.exit(main())
