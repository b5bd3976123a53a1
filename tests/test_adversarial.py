"""A cache that is incomplete, torn or tampered with is refused, never read.

Every command that reads a cache meets a real cache on disk with one of four kinds of
damage: a missing data chunk, a missing checksum marker (the chunk's data then rewritten),
an edited structural attribute, a truncated metadata file. Each gives a one-line error
naming the group (``verify``: exit 1 with the group listed), never a number.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import zarr

from backbench.errors import DamagedGroup, IncompleteGroup
from backbench.store import Cache
from backbench.store.verify import verify

B, GROUP = "fake:pixels", "fake~pixels/digits/train"


def _missing_chunk(root: Path) -> None:
    (root / GROUP / "features/c/1/0").unlink()


def _missing_marker(root: Path) -> None:
    (root / GROUP / "chunk_checksum/c/1").unlink()
    chunk = root / GROUP / "features/c/1/0"
    chunk.write_bytes(np.random.default_rng(0).normal(size=chunk.stat().st_size // 4).astype(np.float32).tobytes())


def _edited_attribute(root: Path) -> None:
    meta = root / GROUP / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["attributes"]["n"] = 1100  # more rows than the arrays hold
    meta.write_text(json.dumps(doc))


def _truncated_metadata(root: Path) -> None:
    meta = root / GROUP / "zarr.json"
    text = meta.read_text()
    meta.write_text(text[: len(text) // 2])


DAMAGE = {"missing-chunk": _missing_chunk, "missing-marker": _missing_marker,
          "edited-attribute": _edited_attribute, "truncated-metadata": _truncated_metadata}


def _commands(cache: str, tmp: Path) -> dict[str, list[str]]:
    c = ["--cache", cache]
    return {
        "info": ["info", B, "digits", "train", *c],
        "probe": ["probe", "-b", B, "-d", "digits", "--train", "train", "--eval", "test", "--C", "1", *c],
        "fewshot": ["probe", "-b", B, "-d", "digits", "--train", "train", "--eval", "test", "--shots", "2",
                    "--seeds", "1", "--C", "1", *c],
        "knn": ["knn", "-b", B, "-d", "digits", "--train", "train", "--eval", "test", "-k", "5", *c],
        "retrieve": ["retrieve", "-b", B, "-d", "digits", "--query", "test", "--gallery", "train", *c],
        "ood": ["ood", "-b", B, "-d", "digits", "--train", "train", "--eval", "test",
                "--ood", "digits:val", "--scores", "mahalanobis", *c],
        "shift": ["shift", "-b", B, "-d", "digits", "--train", "train", "--eval", "test", "--shifted", "digits:val", *c],
        "export": ["export", "--to", str(tmp / "x.h5"), *c],
        "pack": ["pack", "--to", str(tmp / "x.zip"), *c],
        "merge": ["merge", cache, "--into", str(tmp / "merged.zarr")],
    }


COMMANDS = ["info", "probe", "fewshot", "knn", "retrieve", "ood", "shift", "export", "pack", "merge"]


@pytest.mark.parametrize("damage", list(DAMAGE))
@pytest.mark.parametrize("command", COMMANDS)
def test_every_reader_refuses_a_damaged_group(digits_cache, tmp_path, run_cli, damage, command):
    DAMAGE[damage](Path(digits_cache))
    if damage == "missing-marker" and command in ("info", "merge", "export"):
        pytest.skip("an incomplete group is shown (info) or copied as incomplete (merge, export): tested below")
    code, out, err = run_cli(*_commands(digits_cache, tmp_path)[command])
    assert code == 1, (out, err)
    assert out == "", out  # no table, no number
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and GROUP in lines[0], err
    assert "unexpected" not in err


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_verify_lists_the_damaged_group_and_checks_the_rest(digits_cache, run_cli, damage):
    DAMAGE[damage](Path(digits_cache))
    code, out, err = run_cli("verify", "--cache", digits_cache, "--json")
    assert code == 1, err
    report = json.loads(out)
    assert {p["group"] for p in report["problems"]} == {GROUP}
    assert report["chunks_checked"] >= 4  # the val and test groups were still verified
    code, out, _ = run_cli("verify", "--cache", digits_cache)
    assert code == 1 and GROUP in out


@pytest.mark.parametrize("damage", ["missing-chunk", "edited-attribute", "truncated-metadata"])
def test_ls_lists_the_others_and_names_the_damaged_group(digits_cache, run_cli, damage):
    DAMAGE[damage](Path(digits_cache))
    code, out, err = run_cli("ls", "--cache", digits_cache, "--json")
    assert code == 1
    listed = json.loads(out)
    assert sorted(g["split"] for g in listed["groups"]) == ["test", "val"]
    assert len(listed["damaged"]) == 1 and GROUP in listed["damaged"][0]
    assert GROUP in err and len(err.strip().splitlines()) == 1


def test_a_lost_marker_makes_the_group_incomplete_everywhere(digits_cache, run_cli):
    """Issue case 1: marker deleted, data overwritten; nothing trusts the old `complete: true`."""
    _missing_marker(Path(digits_cache))
    group = Cache(digits_cache).group(B, "digits", "train")
    assert group.attrs["complete"] is True  # the stale summary attribute, never read
    assert not group.is_complete and group.rows_done() == 744
    code, out, _ = run_cli("ls", "--cache", digits_cache, "--json")
    row = next(r for r in json.loads(out) if r["split"] == "train")
    assert code == 0 and row["rows_done"] == 744 and row["complete"] is False
    with pytest.raises(IncompleteGroup, match="744 of 1000 rows"):
        group.features()
    problems, _ = verify(Cache(digits_cache, mode="r"))
    assert [(p["group"], p["chunk"], p["status"]) for p in problems] == [(GROUP, 1, "lost")]
    # the finished rows alone are still there for those who ask, and they are the right ones
    X = group.features(complete_only=True)
    assert X.shape == (744, 64)


def test_missing_chunks_of_each_array_are_errors_naming_group_and_chunk(digits_cache):
    from conftest import digits_pixels

    X, y, parts = digits_pixels()
    for array, key in (("features", "c/2/0"), ("labels", "c/2"), ("ids", "c/2")):
        root = Path(digits_cache) / GROUP / array / key
        saved = root.read_bytes()
        root.unlink()
        group = Cache(digits_cache).group(B, "digits", "train")
        with pytest.raises(DamagedGroup, match=f"group {GROUP} is damaged: the file of chunk 2 .*{array}"):
            group.read(array)
        root.write_bytes(saved)
    np.testing.assert_array_equal(Cache(digits_cache).group(B, "digits", "train").labels(), y[parts["train"]])


@pytest.mark.parametrize("key, value", [("n", 999), ("n_chunks", 3), ("chunk_rows", 128), ("dim", 32),
                                        ("dtype", "float16"), ("n", "1000")])
def test_edited_structure_is_refused_by_reads_and_verify(digits_cache, key, value):
    node = zarr.open_group(digits_cache, mode="r+")[GROUP]
    node.attrs[key] = value
    with pytest.raises(DamagedGroup, match=f"group {GROUP} is damaged: .*{key}"):
        Cache(digits_cache).group(B, "digits", "train").features()
    problems, _ = verify(Cache(digits_cache, mode="r"))
    assert [(p["group"], p["status"]) for p in problems] == [(GROUP, "damaged")]


def test_truncated_metadata_is_named_with_its_file(digits_cache, run_cli):
    _truncated_metadata(Path(digits_cache))
    code, _, err = run_cli("probe", "-b", B, "-d", "digits", "--train", "train", "--eval", "test", "--C", "1",
                           "--cache", digits_cache)
    assert code == 1 and f"{GROUP}/zarr.json cannot be read" in err and "JSONDecodeError" in err
    # the other groups still read
    assert Cache(digits_cache).group(B, "digits", "test").features().shape == (497, 64)


def _extract(cache: str, *extra: str) -> list[str]:
    import sys

    return [sys.executable, "-m", "backbench", "extract", "timm:test_resnet@random", "--data", "digits",
            "--dataset", "digits", "--split", "test", "--cache", cache, "--chunk-rows", "16", "--batch-size", "8", "--limit", "64",
            "--workers", "0", *extra]


def test_overwrite_waits_for_a_running_extraction_and_never_tears_the_group(tmp_path):
    """Issue case 4: ``extract --overwrite`` of a group that another extract is writing."""
    import subprocess
    import time

    cache = str(tmp_path / "c.zarr")
    first = subprocess.Popen(_extract(cache), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    meta = Path(cache, "timm~test_resnet@random/digits/test/chunk_checksum/zarr.json")
    deadline = time.monotonic() + 120
    while not meta.exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    second = subprocess.run(_extract(cache, "--overwrite", "--dtype", "float32"), capture_output=True, text=True,
                            timeout=300)
    out1 = first.communicate(timeout=300)
    assert first.returncode == 0 and second.returncode == 0, (out1, second.stderr)
    if first.returncode == 0 and "waiting" not in second.stdout + second.stderr:
        assert "extracted" in out1[0]  # the first had finished before the overwrite began: nothing to race
    group = Cache(cache).group("timm:test_resnet@random", "digits", "test")
    assert group.attrs["dtype"] == "float32" and group.array("features").dtype == np.float32
    assert group.is_complete and verify(Cache(cache, mode="r"))[0] == []
    assert group.features().shape == (group.n, group.dim)


def test_a_pack_with_a_rewritten_chunk_and_no_marker_is_refused(digits_cache, tmp_path, run_cli):
    """Issue case 1 through a pack: a chunk's features set to 1000.0 and its marker left out."""
    import zipfile

    good, evil = tmp_path / "good.zip", tmp_path / "evil.zip"
    code, _, err = run_cli("pack", GROUP, "--to", str(good), "--cache", digits_cache)
    assert code == 0, err
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(evil, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename == f"{GROUP}/chunk_checksum/c/2":
                continue
            if info.filename == f"{GROUP}/features/c/2/0":
                data = np.full(len(data) // 4, 1000.0, dtype=np.float32).tobytes()
            dst.writestr(info, data)
    into = tmp_path / "into.zarr"
    code, out, err = run_cli("unpack", str(evil), "--into", str(into))
    assert code == 1 and out == "" and GROUP in err and "chunk 2" in err
    assert not into.exists()  # nothing was moved, no empty cache left behind


def test_a_truncated_root_metadata_file_is_named(digits_cache, run_cli):
    meta = Path(digits_cache, "zarr.json")
    meta.write_text(meta.read_text()[:40])
    code, out, err = run_cli("ls", "--cache", digits_cache)
    assert code == 1 and out == "" and "its root zarr.json cannot be read" in err and digits_cache in err


def test_merge_and_export_carry_a_lost_marker_as_an_incomplete_group(digits_cache, tmp_path, run_cli):
    """A group whose marker is gone is copied as what its markers say: incomplete, never whole."""
    _missing_marker(Path(digits_cache))
    into = str(tmp_path / "m.zarr")
    code, out, err = run_cli("merge", digits_cache, "--into", into)
    assert code == 0, err
    merged = Cache(into).group(B, "digits", "train")
    assert merged.rows_done() == 744 and not merged.is_complete
    with pytest.raises(IncompleteGroup):
        merged.features()
    code, _, err = run_cli("export", "--to", str(tmp_path / "x.h5"), "--cache", digits_cache)
    assert code == 0, err
    code, out, err = run_cli("import", str(tmp_path / "x.h5"), "--cache", str(tmp_path / "i.zarr"))
    assert code == 0 and "1 incomplete" in out, (out, err)
    assert Cache(str(tmp_path / "i.zarr")).group(B, "digits", "train").rows_done() == 744


def test_overwrite_waits_while_the_group_lock_is_held(tmp_path):
    """Case 4, deterministic: while a writer holds the group's lock (as a running extraction
    does), ``extract --overwrite`` says it waits and leaves the group alone; then replaces it whole."""
    import os
    import subprocess
    import time

    from backbench.extract.run import extract
    from backbench.store.lock import group_locked

    cache, name = str(tmp_path / "c.zarr"), "timm:test_resnet@random"
    extract(name, "digits", cache=cache, dataset="digits", split="test", workers=0, limit=64, chunk_rows=16)
    path = Cache(cache).group_path(name, "digits", "test")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with group_locked(cache, path):
        proc = subprocess.Popen(_extract(cache, "--overwrite", "--dtype", "float32"),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        said = ""
        deadline = time.monotonic() + 120
        while "waiting" not in said and time.monotonic() < deadline and proc.poll() is None:
            said += proc.stdout.readline()
        assert "another process is extracting this group; waiting" in said, said
        held = Cache(cache).group(name, "digits", "test")  # untouched while we hold the lock
        assert held.attrs["dtype"] == "float16" and held.is_complete
    rest, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, said + rest
    group = Cache(cache).group(name, "digits", "test")
    assert group.attrs["dtype"] == "float32" and group.array("features").dtype == np.float32
    assert group.is_complete and group.features().shape == (64, group.dim)
    assert verify(Cache(cache, mode="r"))[0] == []
