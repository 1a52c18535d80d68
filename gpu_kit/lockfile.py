"""constraints.txt from a `pip install --dry-run --report`: every resolved package but the project, pinned.

`make lock` runs it; the header says what the file is for, so a reader of constraints.txt knows.
"""

import json
import sys

HEADER = """\
# The exact versions CI, `make install`, the image and the GPU kit are tested with: pip's -c file
# for pyproject.toml's ranges (runtime, mlflow and test extras; Python 3.11, Linux x86-64).
# Regenerate with `make lock` (LOCK_ARGS="-c old.txt" keeps versions). A site's own packages are
# not bound by it: a plain `pip install .` asks only for the ranges."""


def main(report_path: str) -> None:
    report = json.load(open(report_path))
    pins = {i["metadata"]["name"]: i["metadata"]["version"] for i in report["install"]
            if "dir_info" not in i["download_info"]}  # dir_info: the local project itself
    print(HEADER)
    for name in sorted(pins, key=str.lower):
        print(f"{name}=={pins[name]}")


if __name__ == "__main__":
    main(sys.argv[1])
