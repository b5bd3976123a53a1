"""Issue 18, items 8 and 11: unpack checks the whole pack before anything moves, stays within a
size limit and leaves nothing behind (even after kill -9); pack never leaves a truncated zip;
``*.partial`` leftovers of dead writers are cleaned by the next run. Real packs, real caches,
real processes killed with SIGKILL."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from backbench.errors import CacheError
from backbench.store import Cache
from backbench.store.cleanup import clean_partials, clean_staging
from backbench.store.merge import merge
from backbench.store.share import MANIFEST, pack, unpack
from conftest import digits_pixels, put_group

B = "fake:pixels"
TEST = "fake~pixels/digits/test"
TRAIN = "fake~pixels/digits/train"
BACKBENCH = [sys.executable, "-m", "backbench"]


def _staging(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob(".unpack-*"))


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _rewrite(src: Path, dst: Path, manifest=None, extra: dict[str, bytes] | None = None,
             compression: int = zipfile.ZIP_STORED) -> Path:
    """A copy of the pack ``src`` with another manifest and/or extra members."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", compression=compression) as zout:
        for info in zin.infolist():
            if info.filename == MANIFEST and manifest is not None:
                zout.writestr(MANIFEST, manifest if isinstance(manifest, (str, bytes)) else json.dumps(manifest))
            else:
                zout.writestr(info, zin.read(info))
        for name, data in (extra or {}).items():
            zout.writestr(name, data)
    return dst


@pytest.fixture
def two_groups(digits_cache, tmp_path) -> Path:
    target = tmp_path / "two.zip"
    pack(Cache(digits_cache), [TEST, TRAIN], target)
    return target


# ------------------------------------------------------------------ 8: the manifest, before anything moves


def test_manifest_naming_a_group_the_zip_lacks_moves_nothing(two_groups, tmp_path, run_cli):
    """The issue's case: the first group used to be moved in before `unexpected FileNotFoundError`."""
    bad = _rewrite(two_groups, tmp_path / "bad.zip", {"groups": [TEST, "fake~pixels/digits/val"], "records": 0})
    into = tmp_path / "new.zarr"
    code, out, err = run_cli("unpack", str(bad), "--into", str(into))
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert "names group 'fake~pixels/digits/val', which the pack does not hold; nothing was unpacked" in err
    assert "unexpected" not in err
    assert not into.exists() and _staging(tmp_path) == []  # no empty target cache, no staging folder
    held = tmp_path / "held.zarr"
    put_group(str(held), "fake:other", "x", "train", np.ones((4, 3), np.float32), np.arange(4) % 2)
    before = sorted(p.relative_to(held).as_posix() for p in held.rglob("*"))
    with pytest.raises(CacheError, match="does not hold"):
        unpack(bad, Cache(str(held)))
    assert sorted(p.relative_to(held).as_posix() for p in held.rglob("*")) == before
    assert _staging(tmp_path) == []


@pytest.mark.parametrize("entry", ["../../x", "/x", "../../x/y/z", "/abs/b/c", "fake~pixels/../digits/test",
                                   "fake~pixels/digits/./test", "fake~pixels//test", "fake~pixels\\digits\\test",
                                   "fake~pixels/digits", "_results/a/b", 7, "%2e%2e/x/y"])
def test_unsafe_manifest_entries_are_refused_before_anything_moves(two_groups, tmp_path, entry):
    bad = _rewrite(two_groups, tmp_path / "bad.zip", {"groups": [TEST, entry], "records": 0})
    into = tmp_path / "t.zarr"
    with pytest.raises(CacheError, match="not a group path inside a cache.*nothing was unpacked"):
        unpack(bad, into)
    assert not into.exists() and _staging(tmp_path) == []
    assert not (tmp_path.parent / "x").exists() and not Path("/x").exists()


@pytest.mark.parametrize("manifest, message", [
    ("{not json", "is not valid JSON"),
    ({"groups": "fake~pixels/digits/test"}, "must be"),
    ({"groups": [TEST], "records": "1"}, "must be"),
    ([TEST], "must be"),
])
def test_malformed_manifest_is_one_line(two_groups, tmp_path, run_cli, manifest, message):
    bad = _rewrite(two_groups, tmp_path / "bad.zip", manifest)
    code, _, err = run_cli("unpack", str(bad), "--into", str(tmp_path / "t.zarr"))
    assert code == 1 and message in err and len(err.strip().splitlines()) == 1 and "unexpected" not in err
    assert not (tmp_path / "t.zarr").exists() and _staging(tmp_path) == []


def test_failed_verification_leaves_no_cache_and_no_staging(digits_cache, tmp_path, run_cli):
    target = tmp_path / "p.zip"
    pack(Cache(digits_cache), [TEST], target)
    bad = tmp_path / "bad.zip"
    with zipfile.ZipFile(target) as src, zipfile.ZipFile(bad, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename == f"{TEST}/features/c/0/0":
                data = np.full(len(data) // 4, 1000.0, np.float32).tobytes()
            dst.writestr(info, data)
    code, _, err = run_cli("unpack", str(bad), "--into", str(tmp_path / "t.zarr"))
    assert code == 1 and "fails verification" in err and "chunk 0" in err
    assert not (tmp_path / "t.zarr").exists() and _staging(tmp_path) == []


def test_good_pack_still_unpacks_into_a_new_cache(two_groups, digits_cache, tmp_path, run_cli):
    into = tmp_path / "fresh" / "t.zarr"
    code, out, err = run_cli("unpack", str(two_groups), "--into", str(into))
    assert code == 0, err
    assert "unpacked 2 group(s)" in out and _staging(into.parent) == []
    a, b = Cache(digits_cache, mode="r"), Cache(str(into), mode="r")
    for split in ("train", "test"):
        np.testing.assert_array_equal(a.group(B, "digits", split).features(), b.group(B, "digits", split).features())
    assert b.root.attrs["backbench_groups"] == [TEST, TRAIN]


# ------------------------------------------------------------------ 8: the size limit


def test_pack_expanding_past_ten_times_its_size_is_refused_before_writing(two_groups, tmp_path, run_cli):
    bomb = _rewrite(two_groups, tmp_path / "bomb.zip", extra={f"{TEST}/notes": b"\0" * (64 << 20)},
                    compression=zipfile.ZIP_DEFLATED)
    size = bomb.stat().st_size
    assert size < (64 << 20) // 10  # the zip is small; its members are not
    into = tmp_path / "t.zarr"
    code, _, err = run_cli("unpack", str(bomb), "--into", str(into))
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert "more than the limit of" in err and "10x the pack's size; raise it with --max-size" in err
    assert not into.exists() and _staging(tmp_path) == []
    code, _, err = run_cli("unpack", str(bomb), "--into", str(into), "--max-size", "200MB")
    assert code == 0, err  # an explicit limit above the members' size lets it through
    assert Cache(str(into), mode="r").group(B, "digits", "test").n == len(digits_pixels()[2]["test"])


def test_max_size_below_the_members_and_a_bad_size(two_groups, tmp_path, run_cli):
    into = tmp_path / "t.zarr"
    code, _, err = run_cli("unpack", str(two_groups), "--into", str(into), "--max-size", "10KB")
    assert code == 1 and "more than the limit of 0.0 MB (--max-size)" in " ".join(err.split())
    code, _, err = run_cli("unpack", str(two_groups), "--into", str(into), "--max-size", "banana")
    assert code == 1 and "--max-size 'banana': give a size such as 20GB or 500MB" in err
    assert not into.exists() and _staging(tmp_path) == []


# ------------------------------------------------------------------ 8: kill -9 mid-unpack


def _wait_for(cond, proc: subprocess.Popen, timeout: float = 120.0) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if cond():
            return True
        time.sleep(0.002)
    return False


def _big_pack(src: Path, dst: Path, mb: int = 768) -> Path:
    """``src`` plus one member of ``mb`` MB zeros (deflated: a small zip that takes a while to unpack)."""
    _rewrite(src, dst)
    with zipfile.ZipFile(dst, "a", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        with zf.open(f"{TEST}/big", "w", force_zip64=True) as fh:
            block = b"\0" * (1 << 20)
            for _ in range(mb):
                fh.write(block)
    return dst


def test_kill_9_mid_unpack_leaves_no_cache_and_the_next_run_cleans_up(two_groups, digits_cache, tmp_path):
    big = _big_pack(two_groups, tmp_path / "big.zip")
    into = tmp_path / "t.zarr"
    proc = subprocess.Popen([*BACKBENCH, "unpack", str(big), "--into", str(into), "--max-size", "2GB"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def writing() -> bool:
        return any(f.is_file() and f.stat().st_size > 0 for d in tmp_path.glob(".unpack-*") for f in d.rglob("big"))

    hit = _wait_for(writing, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert hit and proc.returncode == -signal.SIGKILL  # killed while writing the big member
    assert len(_staging(tmp_path)) == 1 and not into.exists()  # staging left by the kill; no cache made
    code = subprocess.run([*BACKBENCH, "unpack", str(two_groups), "--into", str(into)], capture_output=True,
                          text=True)
    assert code.returncode == 0, code.stderr
    assert _staging(tmp_path) == []  # the next unpack removed the dead one's staging folder
    np.testing.assert_array_equal(Cache(str(into), mode="r").group(B, "digits", "test").features(),
                                  Cache(digits_cache, mode="r").group(B, "digits", "test").features())


def test_opening_a_cache_for_writing_cleans_dead_staging_only(tmp_path):
    into = tmp_path / "t.zarr"
    put_group(str(into), B, "x", "train", np.ones((4, 3), np.float32), np.arange(4) % 2)
    dead = tmp_path / f".unpack-t.zarr.{_dead_pid()}.abcd1234"
    alive = tmp_path / f".unpack-t.zarr.{os.getpid()}.efgh5678"  # a running unpack's: kept
    other = tmp_path / f".unpack-t.zarr2.{_dead_pid()}.ijkl9012"  # another cache's: not ours to judge here
    for d in (dead, alive, other):
        (d / "fake~pixels").mkdir(parents=True)
    Cache(str(into), mode="r")  # reading cleans nothing
    assert dead.exists()
    Cache(str(into), mode="r+")
    assert not dead.exists() and alive.exists() and other.exists()
    assert clean_staging(tmp_path / "t.zarr2") == 1 and not other.exists()


# ------------------------------------------------------------------ 11: pack writes a temporary name


def _fsize_limited(limit: int):
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, as on a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


@pytest.fixture
def big_cache(tmp_path) -> str:
    """About 250 MB of features: a pack of it takes long enough to be killed half-way."""
    path = str(tmp_path / "big.zarr")
    X = np.random.default_rng(0).normal(size=(480_000, 128)).astype(np.float32)
    put_group(path, B, "big", "train", X, np.arange(len(X)) % 7, chunk_rows=16_384)
    return path


def test_kill_9_mid_pack_leaves_no_truncated_zip_and_the_next_pack_cleans(big_cache, tmp_path):
    target = tmp_path / "out" / "p.zip"
    target.parent.mkdir()
    (target.parent / "notes.partial").write_text("not ours")  # a user's file with the suffix: never touched
    proc = subprocess.Popen([*BACKBENCH, "pack", "--to", str(target), "--cache", big_cache],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def partials() -> list[Path]:
        return [p for p in target.parent.glob("p.zip.*.partial") if p.stat().st_size > (1 << 20)]

    hit = _wait_for(lambda: bool(partials()), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert hit and proc.returncode == -signal.SIGKILL
    assert not target.exists() and len(partials()) == 1  # a truncated zip, but never under the final name
    done = subprocess.run([*BACKBENCH, "pack", "--to", str(target), "--cache", big_cache], capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in target.parent.iterdir()) == ["notes.partial", "p.zip"]
    with zipfile.ZipFile(target) as zf:
        assert zf.testzip() is None
    unpack(target, tmp_path / "back.zarr", max_size=1 << 30)
    np.testing.assert_array_equal(Cache(str(tmp_path / "back.zarr"), mode="r").group(B, "big", "train").features(),
                                  Cache(big_cache, mode="r").group(B, "big", "train").features())


def test_pack_on_a_full_disk_is_one_line_and_leaves_nothing(digits_cache, tmp_path):
    target = tmp_path / "p.zip"
    run = subprocess.run([*BACKBENCH, "pack", "--to", str(target), "--cache", digits_cache], capture_output=True,
                         text=True, preexec_fn=_fsize_limited(16 << 10))
    assert run.returncode == 1 and len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert f"cannot write '{target}'" in run.stderr and "nothing was written" in run.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["features.zarr"]


def test_unpack_on_a_full_disk_is_one_line_and_leaves_nothing(two_groups, tmp_path):
    into = tmp_path / "t.zarr"
    run = subprocess.run([*BACKBENCH, "unpack", str(two_groups), "--into", str(into)], capture_output=True,
                         text=True, preexec_fn=_fsize_limited(16 << 10))
    assert run.returncode == 1 and len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert "cannot unpack" in run.stderr and "nothing was unpacked" in run.stderr
    assert not into.exists() and _staging(tmp_path) == []


# ------------------------------------------------------------------ 11: *.partial files of dead writers


def test_clean_partials_removes_only_dead_writers_files(tmp_path):
    dead, me = _dead_pid(), os.getpid()
    folder = tmp_path / "g" / "features" / "c" / "0"
    folder.mkdir(parents=True)
    files = {
        "gone": folder / f"3.{dead}.140.partial",
        "mine": folder / f"4.{me}.141.partial",
        "odd": folder / "5.partial",
        "data": folder / "3",
    }
    for f in files.values():
        f.write_bytes(b"x")
    assert clean_partials(tmp_path / "g") == 1
    assert not files["gone"].exists() and all(files[k].exists() for k in ("mine", "odd", "data"))
    top = tmp_path / f"p.zip.{dead}.1.partial", tmp_path / f"q.zip.{dead}.1.partial"
    for f in top:
        f.write_bytes(b"x")
    assert clean_partials(tmp_path, recursive=False, name="p.zip") == 1
    assert not top[0].exists() and top[1].exists()


def test_merge_cleans_dead_partials_of_the_group_it_fills(tmp_path):
    X, y = np.arange(40 * 3, dtype=np.float32).reshape(40, 3), np.arange(40) % 2
    src, into = str(tmp_path / "src.zarr"), str(tmp_path / "into.zarr")
    put_group(src, B, "x", "train", X, y, chunk_rows=16)
    meta = dict(Cache(src, mode="r").group(B, "x", "train").attrs)
    group = Cache(into).create_group(B, "x", "train", n=40, dim=3, dtype="float32", chunk_rows=16,
                                     attrs={k: v for k, v in meta.items() if k not in ("cache_key",)})
    group.write_chunk(0, X[:16], y[:16], [f"train/{i}" for i in range(16)])  # then "killed"
    leftover = Path(into) / TRAIN.replace("digits", "x") / "features" / "c" / "1" / f"0.{_dead_pid()}.1.partial"
    leftover.parent.mkdir(parents=True, exist_ok=True)
    leftover.write_bytes(b"half a chunk")
    summary = merge([Cache(src, mode="r")], Cache(into))
    assert summary["chunks_copied"] == 2 and not leftover.exists()
    np.testing.assert_array_equal(Cache(into, mode="r").group(B, "x", "train").features(), X)
