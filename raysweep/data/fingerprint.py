"""A dataset's identity by content: the same bytes give the same fingerprint on any path, clone,
host or mtime, and any changed byte gives a new one (the prepared cache's key holds it).

Local files are hashed (sha256, streamed) once; the digest is remembered in
`<data.cache_dir>/fingerprints.json`, keyed by (resolved path, size, mtime_ns), so a second
sweep pays one stat per file. A hub download is named by its commit and file names instead.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from raysweep.io import atomic_write_json

MEMO_FILE = "fingerprints.json"
# sha256 runs at ~1.3 GB/s per core with the CPU's SHA instructions (measured here; blake2b:
# 0.6 GB/s), so a file's first hash costs about what reading it from disk does.
ALGORITHM = "sha256"


def dataset_fingerprint(root: Path, files: dict[str, list[Path]], cache_dir=None, revision: str = "") -> str:
    """The digest of (split, file name relative to `root`, file contents) for every file.

    With `revision` (a hub commit), the commit stands for the contents: a commit's files never
    change. `cache_dir` holds the memo of file digests; None hashes without remembering.
    """
    h = hashlib.sha256()
    if revision:
        h.update(f"revision\0{revision}\n".encode())
        digests = {}
    else:
        digests = file_digests([p for paths in files.values() for p in paths], cache_dir)
    for split, paths in files.items():
        for p in paths:
            rel = Path(os.path.relpath(p, root)).as_posix()
            h.update(f"{split}\0{rel}\0{digests.get(p, '')}\n".encode())
    return h.hexdigest()


def file_digests(paths: list[Path], cache_dir=None) -> dict[Path, str]:
    """sha256 of each file's bytes, from the memo where (path, size, mtime_ns) still match."""
    memo_path = Path(cache_dir).expanduser() / MEMO_FILE if cache_dir is not None else None
    memo = _read(memo_path)
    out, fresh = {}, {}
    for p in paths:
        key, st = str(Path(p).resolve()), os.stat(p)
        seen = memo.get(key)
        if seen and seen.get("size") == st.st_size and seen.get("mtime_ns") == st.st_mtime_ns \
                and seen.get("algorithm") == ALGORITHM:
            out[p] = seen["digest"]
            continue
        with open(p, "rb") as f:
            out[p] = hashlib.file_digest(f, ALGORITHM).hexdigest()
        fresh[key] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "algorithm": ALGORITHM, "digest": out[p]}
    if fresh and memo_path is not None:
        # Re-read just before writing so that a concurrent sweep's entries are kept; should two
        # write at once, the loser's entries are only hashed again next time.
        try:
            atomic_write_json(memo_path, {**_read(memo_path), **fresh})
        except OSError:  # a read-only cache dir still prepares; it just hashes every time
            pass
    return out


def _read(path: Path | None) -> dict:
    if path is None or not path.is_file():
        return {}
    try:
        memo = json.loads(path.read_text())
    except (OSError, ValueError):  # a damaged memo costs one rehash, never a wrong answer
        return {}
    return memo if isinstance(memo, dict) else {}
