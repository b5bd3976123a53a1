"""pack / unpack: round trips with results, unsafe archives refused, corrupt chunks refused."""

from __future__ import annotations

import json
import stat
import zipfile

import numpy as np
import pytest

from backbench.errors import CacheError, CacheMismatch
from backbench.probe.tasks import run_probe
from backbench.store.results import ResultsLog
from backbench.store import Cache
from backbench.store.share import pack, unpack
from conftest import put_group

B = "fake:pixels"


def test_round_trip_with_results(digits_cache, tmp_path, run_cli):
    run_probe(Cache(digits_cache), B, "digits", "train", "test", Cs=[0.1, 1.0])
    target = tmp_path / "p.zip"
    code, out, err = run_cli("pack", "fake~pixels/digits/train", "fake~pixels/digits/test", "--to", str(target),
                             "--cache", digits_cache)
    assert code == 0, err
    assert "packed 2 group(s) and 1 record(s)" in out
    other = str(tmp_path / "other.zarr")
    code, out, err = run_cli("unpack", str(target), "--into", other)
    assert code == 0, err
    assert "2 group(s), 1 record(s)" in out
    a, b = Cache(digits_cache), Cache(other)
    for split in ("train", "test"):
        np.testing.assert_array_equal(a.group(B, "digits", split).features(), b.group(B, "digits", split).features())
        assert a.group(B, "digits", split).attrs == b.group(B, "digits", split).attrs
    assert [r["key"] for r in ResultsLog(b).records()] == [r["key"] for r in ResultsLog(a).records()]
    assert (B, "digits", "val") not in b
    rec, reused = run_probe(b, B, "digits", "train", "test", Cs=[0.1, 1.0])
    assert reused  # the record travelled with the groups
    unpack(target, b)  # unpacking the same pack again is harmless


def _zip(tmp_path, members):
    path = tmp_path / "evil.zip"
    with zipfile.ZipFile(path, "w") as zf:
        for name, data, mode in members:
            info = zipfile.ZipInfo(name)
            if mode:
                info.external_attr = mode << 16
            zf.writestr(info, data)
        zf.writestr("backbench-pack.json", json.dumps({"groups": [], "records": 0}))
    return path


@pytest.mark.parametrize(
    "member, message",
    [
        (("../outside.txt", b"x", 0), "outside the cache"),
        (("a/../../outside.txt", b"x", 0), "outside the cache"),
        (("/etc/evil", b"x", 0), "absolute path"),
        (("link", b"/etc/passwd", stat.S_IFLNK | 0o777), "is a link"),
    ],
)
def test_unsafe_archives_are_refused_before_writing(tmp_path, member, message):
    cache = Cache(str(tmp_path / "c.zarr"))
    with pytest.raises(CacheError, match=message):
        unpack(_zip(tmp_path, [member]), cache)
    assert not (tmp_path / "outside.txt").exists()
    assert sorted(p.name for p in (tmp_path / "c.zarr").iterdir()) == ["zarr.json"]


def test_changed_chunk_is_refused(digits_cache, tmp_path):
    target = tmp_path / "p.zip"
    pack(Cache(digits_cache), ["fake~pixels/digits/test"], target)
    bad = tmp_path / "bad.zip"
    with zipfile.ZipFile(target) as src, zipfile.ZipFile(bad, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("features/c/0/0"):
                data = data[:10] + bytes([data[10] ^ 0xFF]) + data[11:]
            dst.writestr(info, data)  # a fresh, valid CRC: only the chunk checksums can tell
    cache = Cache(str(tmp_path / "c.zarr"))
    with pytest.raises(CacheError, match="fails verification.*chunk 0"):
        unpack(bad, cache)
    assert list(cache.groups()) == []


def test_conflicting_group_is_refused(digits_cache, tmp_path):
    target = tmp_path / "p.zip"
    pack(Cache(digits_cache), ["fake~pixels/digits/test"], target)
    other = str(tmp_path / "o.zarr")
    put_group(other, B, "digits", "test", np.zeros((3, 64), np.float32), np.arange(3))
    with pytest.raises(CacheMismatch, match="other contents"):
        unpack(target, Cache(other))
    with pytest.raises(CacheError, match="not a backbench pack"):
        (tmp_path / "x.zip").write_text("nope")
        unpack(tmp_path / "x.zip", Cache(other))
