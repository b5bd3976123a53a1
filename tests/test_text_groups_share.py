"""Cached text embeddings (``_text/...`` groups) travel with pack, merge and export/import like
feature groups: with the records that read them, checked whole on the way, refused when torn."""

from __future__ import annotations

import json
import shutil
import sys
import zipfile

import numpy as np
import pytest

import backbench
from backbench.errors import CacheError, CacheMismatch
from backbench.extract.run import extract
from backbench.store import Cache
from backbench.store.export import export_h5, import_report
from backbench.store.group import FeatureGroup, cache_key
from backbench.store.merge import merge_caches
from backbench.store.share import pack, unpack
from backbench.store.text_groups import text_groups

CLIP = "open_clip:ViT-S-32@random"
TEMPLATES = ["a photo of a {c}.", "art of a {c}"]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A cache with random open_clip image features of 9 images and one zero-shot record (its text group)."""
    from conftest import write_image

    root = tmp_path_factory.mktemp("tg")
    for c, name in enumerate(["cat", "dog", "eel"]):
        for i in range(3):
            write_image(root / "images" / name / f"{i}.png", seed=10 * c + i)
    path = str(root / "src.zarr")
    extract(CLIP, f"imagefolder:{root / 'images'}", cache=path, dataset="toy", split="test", workers=0,
            dtype="float32", device="cpu")
    result = backbench.zeroshot(CLIP, "toy", eval="test", templates=TEMPLATES, cache=path, device="cpu")
    return path, result.record


@pytest.fixture
def copy(source, tmp_path):
    """A fresh copy of the source cache, to damage."""
    shutil.copytree(source[0], tmp_path / "copy.zarr")
    return str(tmp_path / "copy.zarr")


def _text(path: str, mode: str = "r") -> FeatureGroup:
    (group,) = text_groups(Cache(path, mode=mode))
    return group


def _no_tower(monkeypatch) -> None:
    def refuse(*args):
        raise AssertionError("the text tower was loaded although its embeddings were carried")

    monkeypatch.setattr(sys.modules["backbench.extract.text"], "load_text_tower", refuse)


def _same_answer(path: str, record: dict, monkeypatch) -> None:
    """The carried text group answers zero-shot in ``path`` without the text tower, as in the source."""
    _no_tower(monkeypatch)
    again = backbench.zeroshot(CLIP, "toy", eval="test", templates=TEMPLATES, cache=path, device="cpu", force=True)
    assert again.record["metrics"] == record["metrics"] and again.record["groups"] == record["groups"]


def _equal(a: FeatureGroup, b: FeatureGroup) -> None:
    assert a.path == b.path and a.attrs["cache_key"] == b.attrs["cache_key"]
    for name in ("features", "labels", "ids", "chunk_checksum"):
        np.testing.assert_array_equal(a.array(name)[:], b.array(name)[:])


def _tear(path: str) -> str:
    group = _text(path, "a")
    group.array("chunk_checksum")[0] = -1
    return group.path


def test_pack_carries_the_text_groups_its_records_read(source, tmp_path, monkeypatch):
    path, record = source
    image = Cache(path).group(CLIP, "toy", "test").path
    manifest = pack(Cache(path, mode="r"), [image], tmp_path / "p.zip")
    text = _text(path)
    assert manifest == {"groups": [image], "records": 1, "text": [text.path]}
    result = unpack(tmp_path / "p.zip", str(tmp_path / "new.zarr"))
    assert result["chunks_verified"] == Cache(path).group(CLIP, "toy", "test").n_chunks + text.n_chunks
    _equal(_text(str(tmp_path / "new.zarr")), text)
    assert [g.path for g in Cache(str(tmp_path / "new.zarr")).groups()] == [image]  # not listed as features
    _same_answer(str(tmp_path / "new.zarr"), record, monkeypatch)
    whole = pack(Cache(path, mode="r"), [], tmp_path / "all.zip")  # the whole cache: every text group
    assert whole["text"] == [text.path] and whole["records"] == 1


def test_a_torn_text_group_is_refused_by_pack_merge_and_export(copy, tmp_path):
    torn = _tear(copy)
    cache = Cache(copy, mode="r")
    image = cache.group(CLIP, "toy", "test").path
    for run in (lambda: pack(cache, [image], tmp_path / "p.zip"),
                lambda: merge_caches([copy], str(tmp_path / "m.zarr")),
                lambda: export_h5(cache, tmp_path / "e.h5")):
        with pytest.raises(CacheError, match=f"text embeddings {torn} .* torn: .*; nothing was") as info:
            run()
        assert "\n" not in str(info.value)
    assert not (tmp_path / "p.zip").exists() and not (tmp_path / "m.zarr").exists()
    assert not (tmp_path / "e.h5").exists()


def test_unpack_verifies_the_text_groups_chunks(source, tmp_path):
    path, _ = source
    pack(Cache(path, mode="r"), [], tmp_path / "p.zip")
    text = _text(path).path
    with zipfile.ZipFile(tmp_path / "p.zip") as zf:  # a valid zip whose text features changed after packing
        members = {i.filename: zf.read(i) for i in zf.infolist()}
    chunk = next(n for n in members if n.startswith(f"{text}/features/c/"))
    members[chunk] = bytes([members[chunk][0] ^ 0xFF]) + members[chunk][1:]
    with zipfile.ZipFile(tmp_path / "bad.zip", "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    with pytest.raises(CacheError, match=f"pack fails verification at {text}: damaged: .*nothing was unpacked"):
        unpack(tmp_path / "bad.zip", str(tmp_path / "new.zarr"))
    assert not (tmp_path / "new.zarr" / "_text").exists()
    manifest = json.loads(members["backbench-pack.json"])
    manifest["text"] = ["toy/x/y"]  # a feature path listed as text: refused before anything is written
    members["backbench-pack.json"] = json.dumps(manifest).encode()
    with zipfile.ZipFile(tmp_path / "odd.zip", "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    with pytest.raises(CacheError, match="manifest names 'toy/x/y'"):
        unpack(tmp_path / "odd.zip", str(tmp_path / "new.zarr"))


def test_the_cli_says_what_text_groups_travelled(source, tmp_path, run_cli):
    path, _ = source
    def said(*args: str) -> str:  # the printed line, unwrapped
        code, out, err = run_cli(*args)
        assert code == 0, err
        return " ".join(out.split())

    out = said("pack", "--to", str(tmp_path / "p.zip"), "--cache", path)
    assert "packed 1 group(s) and 1 record(s)" in out and "with the 1 text embedding group(s) they read" in out
    out = said("unpack", str(tmp_path / "p.zip"), "--into", str(tmp_path / "u.zarr"))
    assert "unpacked 1 group(s), 1 record(s), 1 text embedding group(s);" in out
    out = said("merge", path, "--into", str(tmp_path / "m.zarr"))
    assert "1 record(s) copied, 1 text embedding group(s) copied" in out


def test_merge_copies_text_groups_checked_and_refuses_a_conflicting_one(source, copy, tmp_path, monkeypatch):
    path, record = source
    into = str(tmp_path / "m.zarr")
    result = merge_caches([path], into)
    text = _text(path)
    assert result["texts_copied"] == [text.path] and result["records_copied"] == 1
    _equal(_text(into), text)
    assert merge_caches([path], into)["texts_present"] == [text.path]
    group = _text(copy, "a")  # the same texts' group for other weights: another fingerprint at the same path
    attrs = {**group.attrs, "weights_sha256": "0" * 64}
    group.node.attrs.update({"weights_sha256": "0" * 64, "cache_key": cache_key(attrs)})
    with pytest.raises(CacheMismatch, match=f"{text.path} conflicts"):
        merge_caches([path, copy], str(tmp_path / "m2.zarr"))
    _same_answer(into, record, monkeypatch)


def test_export_and_import_carry_text_groups(source, tmp_path, monkeypatch):
    pytest.importorskip("h5py")
    path, record = source
    written = export_h5(Cache(path, mode="r"), tmp_path / "e.h5")
    text = _text(path)
    assert text.path in written
    into = str(tmp_path / "i.zarr")
    report = import_report(tmp_path / "e.h5", Cache(into))
    assert sorted(report["groups"]) == sorted(written) and not report["incomplete"]
    _equal(_text(into), text)
    assert [g.path for g in Cache(into).groups()] == [Cache(path).group(CLIP, "toy", "test").path]
    assert import_report(tmp_path / "e.h5", Cache(into))["already_present"] == report["groups"]
    # records do not travel in HDF5: zero-shot recomputes the metrics from the carried text group
    _same_answer(into, record, monkeypatch)
    import h5py

    with h5py.File(tmp_path / "e.h5", "r+") as h5:  # a torn text group in a file is refused before any import
        h5[text.path]["chunk_checksum"][0] = -1
    with pytest.raises(CacheError, match=f"text embeddings {text.path} are torn .*; nothing was imported"):
        import_report(tmp_path / "e.h5", Cache(str(tmp_path / "j.zarr")))
    assert list(text_groups(Cache(str(tmp_path / "j.zarr")))) == []
