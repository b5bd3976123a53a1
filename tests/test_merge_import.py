"""merge (caches into one) and import (HDF5 files): real zarr caches, real h5py files."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from backbench.errors import CacheError, CacheMismatch
from backbench.store.results import ResultsLog
from backbench.store import Cache
from backbench.store.export import export_h5, import_h5
from backbench.store.merge import merge
from conftest import put_group

B, OTHER = "fake:pixels", "fake:other"


def _data(n: int, dim: int = 8, seed: int = 0, classes: int = 3):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, dim)).astype(np.float32), rng.integers(0, classes, n)


def _record(cache: str, key: str, **extra) -> None:
    ResultsLog(Cache(cache)).put({"key": key, "task": "probe", "metrics": {"top1": 0.5}, **extra})


def _same_group(a: Cache, b: Cache, key: tuple[str, str, str], complete_only: bool = False) -> None:
    ga, gb = a.group(*key), b.group(*key)
    for name in ("features", "labels", "ids"):
        np.testing.assert_array_equal(ga.read(name, complete_only=complete_only),
                                      gb.read(name, complete_only=complete_only))
    if ga.has_logits:
        np.testing.assert_array_equal(ga.logits(), gb.logits())
    assert ga.attrs == gb.attrs
    np.testing.assert_array_equal(ga.stored_checksums(), gb.stored_checksums())


def _partial(cache: str, key: tuple[str, str, str], X, y, chunks: list[int], chunk_rows: int = 3, **attrs) -> None:
    """A group of len(y) rows with only ``chunks`` written (an interrupted extraction)."""
    meta = {"backbench_kind": "features", "backbone": key[0], "weights_sha256": "w" * 64, "preprocess": {},
            "feature_kind": "pooled", "dataset": key[1], "split": key[2], "source": "test",
            "dataset_fingerprint": "partial", "classes": ["0", "1", "2"], "dtype": "float32", **attrs}
    group = Cache(cache).create_group(*key, n=len(y), dim=X.shape[1], dtype="float32", chunk_rows=chunk_rows,
                                      attrs=meta)
    for c in chunks:
        a, b = group.chunk_bounds(c)
        group.write_chunk(c, X[a:b], y[a:b], [f"{key[2]}/{i}" for i in range(a, b)])
    group.finalize()


# ------------------------------------------------------------------------- merge
def test_merge_disjoint_caches_gives_both(tmp_path, run_cli):
    a, b, into = (str(tmp_path / f"{n}.zarr") for n in ("a", "b", "all"))
    Xa, ya = _data(700, seed=1)
    Xb, yb = _data(50, dim=5, seed=2)
    put_group(a, B, "toy", "train", Xa, ya, chunk_rows=128)
    put_group(a, B, "toy", "test", Xb[:, :1].repeat(8, 1), yb, logits=np.ones((50, 3), np.float32))
    put_group(b, OTHER, "toy", "train", Xb, yb, chunk_rows=16)
    _record(a, "r1")
    _record(b, "r2")
    code, out, err = run_cli("merge", a, b, "--into", into)
    assert code == 0, err
    assert f"merged 2 cache(s) into {into}: 3 group(s) copied" in out and "2 record(s) copied" in out
    target = Cache(into)
    for src, key in ((a, (B, "toy", "train")), (a, (B, "toy", "test")), (b, (OTHER, "toy", "train"))):
        _same_group(Cache(src), target, key)
    assert sorted(r["key"] for r in ResultsLog(target).records()) == ["r1", "r2"]
    code, out, _ = run_cli("verify", "--cache", into)
    assert code == 0 and "all checksums match" in out


def test_merge_overlapping_identical_groups_once_and_rerun(tmp_path, run_cli):
    a, b, into = (str(tmp_path / f"{n}.zarr") for n in ("a", "b", "all"))
    X, y = _data(300)
    for cache in (a, b):
        put_group(cache, B, "toy", "train", X, y, chunk_rows=64)
        _record(cache, "same")
    put_group(b, B, "toy", "test", X[:10], y[:10])
    result = merge([Cache(a, mode="r"), Cache(b, mode="r")], Cache(into))
    assert result["groups_copied"] == ["fake~pixels/toy/train", "fake~pixels/toy/test"]
    assert result["chunks_copied"] == 5 + 1 and result["records_copied"] == 1 and result["records_present"] == 1
    _same_group(Cache(a), Cache(into), (B, "toy", "train"))
    code, out, err = run_cli("merge", a, b, "--into", into, "--json")  # again: nothing to do
    again = json.loads(out)
    assert code == 0, err
    assert again["groups_copied"] == [] and len(again["groups_present"]) == 2
    assert again["chunks_copied"] == 0 and again["records_copied"] == 0 and again["incomplete"] == []


def test_merge_conflict_refused_before_writing(tmp_path, run_cli):
    a, b, into = (str(tmp_path / f"{n}.zarr") for n in ("a", "b", "all"))
    X, y = _data(20)
    put_group(a, B, "toy", "train", X, y)
    put_group(a, B, "toy", "test", X, y)
    put_group(b, B, "toy", "train", X, y, weights_sha256="v" * 64)  # other weights, same name
    code, out, err = run_cli("merge", a, b, "--into", into)
    assert code == 1 and out == ""
    assert "fake~pixels/toy/train conflicts" in err and a in err and b in err and "nothing was merged" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not Path(into).exists()  # the target was not even created
    # a target that holds the group with another fingerprint is left as it was
    put_group(into, B, "toy", "train", X, y, weights_sha256="v" * 64)
    before = sorted(str(p.relative_to(into)) for p in Path(into).rglob("*"))
    code, _, err = run_cli("merge", a, "--into", into)
    assert code == 1 and "conflicts" in err and into in err
    assert sorted(str(p.relative_to(into)) for p in Path(into).rglob("*")) == before
    with pytest.raises(CacheMismatch, match="conflicts"):
        merge([Cache(a, mode="r"), Cache(b, mode="r")], Cache(str(tmp_path / "x.zarr")))


def test_merge_into_an_input_is_refused(tmp_path, run_cli):
    a, b = str(tmp_path / "a.zarr"), str(tmp_path / "b.zarr")
    X, y = _data(10)
    put_group(a, B, "toy", "train", X, y)
    put_group(b, B, "toy", "test", X, y)
    code, _, err = run_cli("merge", a, b, "--into", str(tmp_path / "." / "b.zarr"))
    assert code == 1 and "is also one of the inputs" in err
    with pytest.raises(CacheError, match="both an input and the target"):
        merge([Cache(a, mode="r"), Cache(b, mode="r")], Cache(b))
    code, _, err = run_cli("merge", str(tmp_path / "nope.zarr"), "--into", str(tmp_path / "all.zarr"))
    assert code == 1 and "no feature cache" in err and not (tmp_path / "all.zarr").exists()


def test_merge_takes_the_union_of_finished_chunks(tmp_path):
    a, b, into = (str(tmp_path / f"{n}.zarr") for n in ("a", "b", "all"))
    X, y = _data(10)
    key = (B, "toy", "train")
    _partial(a, key, X, y, [0, 1])
    _partial(b, key, X, y, [1, 3])
    result = merge([Cache(a, mode="r"), Cache(b, mode="r")], Cache(into))
    group = Cache(into).group(*key)
    assert result["incomplete"] == [{"group": group.path, "rows_done": 7, "n": 10}]
    assert group.stored_checksums()[2] == -1 and not group.is_complete
    np.testing.assert_array_equal(group.features(complete_only=True), X[[0, 1, 2, 3, 4, 5, 9]])
    for src in (a, b):  # copied checksums are the sources' own
        done = Cache(src).group(*key).done_chunks()
        np.testing.assert_array_equal(group.stored_checksums()[done], Cache(src).group(*key).stored_checksums()[done])
    # a third cache with the missing chunk completes the target in place
    c = str(tmp_path / "c.zarr")
    _partial(c, key, X, y, [2])
    result = merge([Cache(c, mode="r")], Cache(into))
    assert result["groups_copied"] == [group.path] and result["chunks_copied"] == 1 and result["incomplete"] == []
    full = str(tmp_path / "full.zarr")
    _partial(full, key, X, y, [0, 1, 2, 3])
    _same_group(Cache(full), Cache(into), key)
    assert Cache(into).group(*key).attrs["complete"] is True


def test_merge_refuses_a_changed_source_chunk(tmp_path):
    a, into = str(tmp_path / "a.zarr"), str(tmp_path / "all.zarr")
    X, y = _data(10)
    _partial(a, (B, "toy", "train"), X, y, [0, 1, 2, 3])
    chunk = Path(a, "fake~pixels/toy/train/features/c/1/0")
    data = bytearray(chunk.read_bytes())
    data[0] ^= 0xFF
    chunk.write_bytes(bytes(data))
    with pytest.raises(CacheError, match="chunk 1 fails its checksum"):
        merge([Cache(a, mode="r")], Cache(into))
    assert Cache(into).group(B, "toy", "train").stored_checksums()[1] == -1  # never marked done


# ------------------------------------------------------------------------ import
def test_export_import_round_trip(digits_cache, tmp_path, run_cli):
    X, y = _data(40, dim=6)
    put_group(digits_cache, OTHER, "toy", "train", X, y, chunk_rows=16, logits=X[:, :3] * 2)
    _partial(digits_cache, (OTHER, "toy", "test"), X[:10], y[:10], [0, 2])
    h5 = tmp_path / "all.h5"
    export_h5(Cache(digits_cache, mode="r"), h5)
    other = str(tmp_path / "other.zarr")
    code, out, err = run_cli("import", str(h5), "--cache", other)
    assert code == 0, err
    assert "imported 5 group(s)" in out and "1 incomplete" in out
    a, b = Cache(digits_cache), Cache(other)
    for g in a.groups():
        key = (g.attrs["backbone"], g.attrs["dataset"], g.attrs["split"])
        _same_group(a, b, key, complete_only=not g.is_complete)
    code, out, _ = run_cli("verify", "--cache", other)
    assert code == 0 and "all checksums match" in out
    code, out, _ = run_cli("import", str(h5), "--cache", other)
    assert code == 0 and "5 group(s) already present" in out
    # --backbone/--dataset/--split pick groups of an export
    third = str(tmp_path / "third.zarr")
    assert import_h5(h5, Cache(third), split="val") == ["fake~pixels/digits/val"]
    assert [g.path for g in Cache(third).groups()] == ["fake~pixels/digits/val"]
    # exports made before the JSON attribute list still read back the same
    with h5py.File(h5, "a") as f:
        for name in ("fake~pixels/digits/val", "fake~other/toy/train"):
            del f[name].attrs["backbench_json_attrs"]
    fourth = Cache(str(tmp_path / "fourth.zarr"))
    import_h5(h5, fourth, backbone=OTHER, split="train")
    _same_group(a, fourth, (OTHER, "toy", "train"))


def _tool_file(path: Path, X, y, names=None, *, where: str = "", **extra) -> Path:
    """An HDF5 file as thingsvision users write it: features, targets, filenames."""
    with h5py.File(path, "w") as h5:
        g = h5.require_group(where) if where else h5
        g.create_dataset("features", data=X)
        if y is not None:
            g.create_dataset("targets", data=y)
        if names is not None:
            g.create_dataset("filenames", data=np.array(names, dtype=object), dtype=h5py.string_dtype())
        for k, v in extra.items():
            g.create_dataset(k, data=v)
    return path


def test_thingsvision_style_files_import_and_probe(tmp_path, run_cli):
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X = X.astype(np.float32)
    names = [f"img/{i:04d}.png" for i in range(len(y))]
    train = _tool_file(tmp_path / "train.h5", X[:1200], y[:1200], names[:1200])
    test = _tool_file(tmp_path / "test.h5", X[1200:], y[1200:], names[1200:], where="clip")
    cache = str(tmp_path / "c.zarr")
    for f, split in ((train, "train"), (test, "test")):
        code, out, err = run_cli("import", str(f), "--cache", cache, "--backbone", "thingsvision:clip",
                                 "--dataset", "digits", "--split", split)
        assert code == 0, err
        assert f"imported 1 group(s) from {f}" in out
    g = Cache(cache).group("thingsvision:clip", "digits", "test")
    np.testing.assert_array_equal(g.features(), X[1200:].astype(np.float16))
    np.testing.assert_array_equal(g.labels(), y[1200:])
    assert g.ids().tolist() == names[1200:]
    a = g.attrs
    assert a["source"] == f"hdf5:{test}" and a["weights_sha256"] == "unknown (imported from HDF5)"
    assert a["preprocess"] == {"imported": True} and a["feature_kind"] == "pooled" and a["dtype"] == "float16"
    assert a["classes"] == [str(c) for c in range(10)] and len(a["dataset_fingerprint"]) == 64
    code, out, err = run_cli("probe", "-b", "thingsvision:clip", "-d", "digits", "--train", "train", "--eval",
                             "test", "--C", "1", "--cache", cache, "--json")
    assert code == 0, err
    assert json.loads(out)[0]["metrics"]["top1"] > 0.8
    code, out, _ = run_cli("import", str(test), "--cache", cache, "-b", "thingsvision:clip", "-d", "digits",
                           "--split", "test")
    assert code == 0 and "already present" in out


def test_tool_file_defaults_and_dtype(tmp_path):
    X, _ = _data(30, dim=4)
    labels = np.array(["cat", "dog", "eel"] * 10, dtype=object)
    f = _tool_file(tmp_path / "s.h5", X, None, labels=labels.astype(h5py.string_dtype()))
    cache = Cache(str(tmp_path / "c.zarr"))
    assert import_h5(f, cache, backbone="x", dataset="toy", split="all", dtype="float32") == ["x/toy/all"]
    g = cache.group("x", "toy", "all")
    np.testing.assert_array_equal(g.features(), X)
    assert g.ids().tolist() == [str(i) for i in range(30)] and g.attrs["classes"] == ["cat", "dog", "eel"]
    np.testing.assert_array_equal(g.labels(), [0, 1, 2] * 10)
    # the same name with other labels is another group: refused, the first one kept
    g2 = _tool_file(tmp_path / "t.h5", X, np.zeros(30, int))
    with pytest.raises(CacheMismatch, match="other contents"):
        import_h5(g2, cache, backbone="x", dataset="toy", split="all", dtype="float32")
    # float16 cannot hold these: refused, nothing left behind
    big = _tool_file(tmp_path / "big.h5", X * 1e6, np.zeros(30, int))
    with pytest.raises(CacheError, match="beyond float16's range; use --dtype float32"):
        import_h5(big, cache, backbone="x", dataset="toy", split="big")
    assert ("x", "toy", "big") not in cache


@pytest.mark.parametrize(
    "make, args, message",
    [
        (lambda p: _tool_file(p, np.zeros((4, 2)), [0, 1, 0, 1]), ["--backbone", "x"],
         "is not a `backbench export`: give --dataset, --split"),
        (lambda p: _tool_file(p, np.zeros((4, 2)), None), ["-b", "x", "-d", "toy", "--split", "s"],
         "f.h5 has no labels dataset (looked for labels, targets)"),
        (lambda p: p.write_text("not hdf5") and p, ["-b", "x"], "f.h5 is not an HDF5 file"),
        (lambda p: p, ["-b", "x"], "no file"),
        (lambda p: _tool_file(p, np.zeros(4), [0, 1, 0, 1]), ["-b", "x", "-d", "toy", "--split", "s"],
         "features has shape (4,)"),
        (lambda p: _tool_file(p, np.zeros((4, 2)), [0, 1, 0]), ["-b", "x", "-d", "toy", "--split", "s"],
         "/targets has shape (3,) but /features has 4 rows"),
        (lambda p: _tool_file(p, np.zeros((4, 2)), [0, 1, 0, 1], ["a"]), ["-b", "x", "-d", "toy", "--split", "s"],
         "/filenames has 1 entries"),
        (lambda p: _tool_file(p, np.zeros((4, 2)), [0, 1, 0, 1]), ["-b", "x", "-d", "toy", "--split", "s",
                                                                  "--dtype", "int8"], "--dtype 'int8'"),
    ],
)
def test_import_errors_are_one_line(tmp_path, run_cli, make, args, message):
    f = tmp_path / "f.h5"
    make(f)
    cache = str(tmp_path / "c.zarr")
    code, out, err = run_cli("import", str(f), "--cache", cache, *args)
    assert code == 1 and out == ""
    assert message in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not Cache(cache).root.attrs.get("backbench_groups") and not list(Cache(cache).groups())


def test_help_shows_examples(run_cli):
    for cmd, example in (("merge", "backbench merge a.zarr b.zarr --into all.zarr"), ("import", "backbench import")):
        code, out, _ = run_cli(cmd, "--help")
        assert code == 0 and example in out
