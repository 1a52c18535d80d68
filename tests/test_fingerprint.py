"""A dataset's identity is its content: copies elsewhere share a fingerprint and a prepared cache,
a changed byte does not, and a second look costs no hashing (the memo in data.cache_dir)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

import raysweep.data.fingerprint as F
from raysweep.data import prepare, resolve_source
from raysweep.data.source import builtin_root


def _copy_elsewhere(src: Path, dst: Path, mtime: int) -> Path:
    """A copy with every file's mtime set to `mtime` (what another clone or host shows)."""
    shutil.copytree(src, dst)
    for p in dst.rglob("*"):
        os.utime(p, ns=(mtime, mtime))
    return dst


@pytest.fixture
def hashes(monkeypatch) -> list[str]:
    """The files hashed, in order (hashlib.file_digest counted, still doing the hashing)."""
    seen, real = [], hashlib.file_digest

    def counted(f, name):
        seen.append(f.name)
        return real(f, name)

    monkeypatch.setattr(F.hashlib, "file_digest", counted)
    return seen


def test_two_copies_with_other_paths_and_mtimes_share_one_fingerprint(synthetic_dir, tmp_path):
    a = _copy_elsewhere(synthetic_dir, tmp_path / "clone-a" / "set", 1_000_000_000 * 10**9)
    b = _copy_elsewhere(synthetic_dir, tmp_path / "host-b" / "data" / "copy", 1_700_000_000 * 10**9)
    fa, fb = resolve_source(str(a)).fingerprint, resolve_source(str(b)).fingerprint
    assert len(fa) == 64 and fa == fb
    assert fa == resolve_source(str(synthetic_dir)).fingerprint


def test_one_changed_byte_gives_a_new_fingerprint(synthetic_dir, tmp_path):
    copy = _copy_elsewhere(synthetic_dir, tmp_path / "copy", 10**18)
    before = resolve_source(str(copy), tmp_path / "cache").fingerprint
    path = copy / "data" / "test-00000-of-00001.parquet"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # inside the image bytes: the footer, and so the layout, stay readable
    path.write_bytes(bytes(data))
    os.utime(path, ns=(10**18, 10**18))  # the same mtime: only the size-and-mtime memo could be fooled,
    assert resolve_source(str(copy)).fingerprint != before  # and without a cache dir there is none
    # With the memo, a new mtime (what any write gives) makes it look again.
    os.utime(path, ns=(10**18 + 1, 10**18 + 1))
    assert resolve_source(str(copy), tmp_path / "cache").fingerprint != before


def test_a_renamed_file_is_other_data(synthetic_dir, tmp_path):
    """File names relative to the root count: the split a file feeds follows from its name."""
    copy = _copy_elsewhere(synthetic_dir, tmp_path / "copy", 10**18)
    data = copy / "data"
    os.rename(data / "validation-00000-of-00001.parquet", data / "validation-00000-of-00002.parquet")
    shutil.copy(data / "validation-00000-of-00002.parquet", data / "validation-00001-of-00002.parquet")
    assert resolve_source(str(copy)).fingerprint != resolve_source(str(synthetic_dir)).fingerprint


def test_the_memo_spares_a_second_hash_and_survives_a_damaged_file(synthetic_dir, tmp_path, hashes):
    cache = tmp_path / "cache"
    first = resolve_source(str(synthetic_dir), cache).fingerprint
    files = sorted(str(p) for p in synthetic_dir.rglob("*.parquet"))
    assert sorted(hashes) == files, "each file hashed once"
    memo = json.loads((cache / F.MEMO_FILE).read_text())
    for f in files:
        entry = memo[str(Path(f).resolve())]
        assert entry["size"] == os.stat(f).st_size and entry["mtime_ns"] == os.stat(f).st_mtime_ns
        assert entry["digest"] == hashlib.sha256(Path(f).read_bytes()).hexdigest()
    hashes.clear()
    assert resolve_source(str(synthetic_dir), cache).fingerprint == first and hashes == []
    (cache / F.MEMO_FILE).write_text("{not json")
    assert resolve_source(str(synthetic_dir), cache).fingerprint == first and len(hashes) == len(files)


def test_builtin_sets_are_named_by_content(tmp_path):
    copy = _copy_elsewhere(builtin_root("builtin:cifar10-sample"), tmp_path / "cifar10-sample", 10**18)
    assert resolve_source(str(copy)).fingerprint == resolve_source("builtin:cifar10-sample").fingerprint


def test_the_early_check_does_not_hash(synthetic_dir, hashes):
    assert resolve_source(str(synthetic_dir), fingerprint=False).fingerprint == "" and hashes == []


@pytest.mark.slow  # a real run of its own, ~10 s: make test-e2e
def test_two_copies_share_one_prepared_cache(ray_session, synthetic_dir, tmp_path):
    """Two clones pointed at one data.cache_dir: the second decodes nothing."""
    a = _copy_elsewhere(synthetic_dir, tmp_path / "a" / "set", 10**18)
    b = _copy_elsewhere(synthetic_dir, tmp_path / "b" / "set", 2 * 10**18)
    cache = tmp_path / "cache"
    first = prepare(str(a), cache, image_size=16, progress=False)
    second = prepare(str(b), cache, image_size=16, progress=False)
    assert first.decoded == sum(first.counts.values()) > 0
    assert second.decoded == 0 and second.path == first.path
    assert second.meta["fingerprint"] == resolve_source(str(b)).fingerprint
