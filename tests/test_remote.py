"""Caches at fsspec URLs: memory:// read and write, a read-only cache served over HTTP (127.0.0.1)."""

from __future__ import annotations

import functools
import http.server
import json
import threading
import uuid
from pathlib import Path

import numpy as np
import pytest

from backbench.errors import CacheError
from backbench.store import Cache
from conftest import put_group

pytest.importorskip("aiohttp")  # fsspec's HTTPFileSystem

RESNET = "timm:test_resnet@random"
B = "fake:pixels"
VOLATILE = {"created", "cache", "reused", "seconds"}  # and *_s: timings, the cache's location, reuse


@pytest.fixture
def memory_url():
    """A fresh memory:// cache URL, removed afterwards (fsspec's memory filesystem is per process)."""
    import fsspec

    name = f"bb-{uuid.uuid4().hex[:12]}.zarr"
    yield f"memory://{name}"
    fs = fsspec.filesystem("memory")
    if fs.exists(f"/{name}"):
        fs.rm(f"/{name}", recursive=True)


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


class _NoListing(_Quiet):
    """A static host that refuses directory listings (as most object stores and CDNs do); with
    status 403, missing files get a 403 too (a public S3 bucket that may not be listed)."""

    status = 404

    def list_directory(self, path):
        self.send_error(self.status, "no directory listings here")
        return None

    def send_error(self, code, message=None, explain=None):
        super().send_error(self.status if code == 404 else code, message, explain)


def _serve(directory: Path, handler=_Quiet):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(directory)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture
def served(digits_cache):
    """The digits cache on a local HTTP server: (local path, http URL)."""
    local = Path(digits_cache)
    server = _serve(local.parent)
    yield str(local), f"http://127.0.0.1:{server.server_address[1]}/{local.name}"
    server.shutdown()
    server.server_close()


def _strip(value):
    """JSON output without timings, cache locations and reuse flags, at any depth."""
    if isinstance(value, list):
        return [_strip(v) for v in value]
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if k not in VOLATILE and not k.endswith("_s")}
    return value


# ------------------------------------------------------------------ memory://


def test_memory_cache_round_trip_and_index(memory_url):
    X = np.random.default_rng(0).normal(size=(70, 5)).astype(np.float32)
    y = np.arange(70) % 3
    put_group(memory_url, B, "toy", "train", X, y, chunk_rows=32)
    put_group(memory_url, B, "toy", "test", X[:20], y[:20], chunk_rows=32)
    cache = Cache(memory_url, mode="r")
    assert cache.is_url and cache.read_only and cache.root.store.read_only
    assert [g.path for g in cache.groups()] == ["fake~pixels/toy/test", "fake~pixels/toy/train"]
    assert cache.root.attrs["backbench_groups"] == ["fake~pixels/toy/test", "fake~pixels/toy/train"]
    group = cache.group(B, "toy", "train")
    np.testing.assert_array_equal(group.features(), X)
    np.testing.assert_array_equal(group.labels(), y)
    assert group.ids().tolist() == [f"train/{i}" for i in range(70)]
    assert group.is_complete and group.attrs["chunks_complete"] == [[0, 3]]


@pytest.mark.parametrize("mode", ["r", "r+"])
def test_missing_memory_cache_is_one_line_error(memory_url, mode, run_cli):
    with pytest.raises(CacheError, match=r"^no feature cache at 'memory://.*'; run `backbench extract` first"):
        Cache(memory_url, mode=mode)
    code, _, err = run_cli("ls", "--cache", memory_url)
    assert code == 1 and "no feature cache at" in err and len(err.strip().splitlines()) == 1


def test_extract_into_memory_equals_local(memory_url, cache_path, run_cli):
    args = ["extract", RESNET, "--data", "digits", "--dataset", "digits", "--split", "test", "--limit", "40",
            "--workers", "0", "--chunk-rows", "16"]
    for where in (memory_url, cache_path):
        code, out, err = run_cli(*args, "--cache", where)
        assert code == 0 and "extracted 40 rows" in out, err
    code, out, _ = run_cli(*args, "--cache", memory_url)  # resumes from the URL: nothing left to do
    assert code == 0 and "nothing to do" in out
    remote, local = Cache(memory_url, mode="r").group(RESNET, "digits", "test"), Cache(cache_path).group(
        RESNET, "digits", "test")
    assert remote.is_complete and remote.attrs["chunks_complete"] == [[0, 3]]
    for name in ("features", "labels", "ids"):
        np.testing.assert_array_equal(remote.read(name), local.read(name))
    np.testing.assert_array_equal(remote.stored_checksums(), local.stored_checksums())
    code, out, _ = run_cli("ls", "--cache", memory_url, "--json")
    assert code == 0 and [r["path"] for r in json.loads(out)] == ["timm~test_resnet@random/digits/test"]


def test_shards_into_a_url_let_shard_0_create_the_group(memory_url, cache_path):
    """No locks at URLs: shard 1 waits for shard 0's group instead of creating (and racing) its own."""
    from backbench.extract.run import extract

    kw = dict(dataset="digits", split="test", workers=0, limit=48, chunk_rows=16, batch_size=16)
    waiting, errors = threading.Event(), []

    def shard_1() -> None:
        try:
            extract(RESNET, "digits", cache=memory_url, shard=(1, 2), on_wait=waiting.set, **kw)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    worker = threading.Thread(target=shard_1)
    worker.start()
    assert waiting.wait(60)
    assert (RESNET, "digits", "test") not in Cache(memory_url, mode="r")
    extract(RESNET, "digits", cache=memory_url, shard=(0, 2), **kw)
    worker.join(120)
    assert not worker.is_alive() and not errors
    extract(RESNET, "digits", cache=cache_path, **kw)
    remote, local = (Cache(c, mode="r").group(RESNET, "digits", "test") for c in (memory_url, cache_path))
    assert remote.is_complete
    np.testing.assert_array_equal(remote.features(), local.features())
    np.testing.assert_array_equal(remote.ids(), local.ids())


def test_probe_on_memory_cache_records_results(memory_url, run_cli):
    X = np.random.default_rng(0).normal(size=(60, 4)).astype(np.float32) + (np.arange(60) % 2)[:, None] * 3
    y = np.arange(60) % 2
    put_group(memory_url, B, "toy", "train", X, y)
    put_group(memory_url, B, "toy", "test", X, y)
    code, out, err = run_cli("knn", "-b", B, "-d", "toy", "--train", "train", "--eval", "test", "-k", "3",
                             "--cache", memory_url, "--json")
    assert code == 0 and "not recorded" not in err
    code, out, _ = run_cli("results", "--cache", memory_url, "--json")
    assert code == 0 and [r["task"] for r in json.loads(out)] == ["knn"]


def test_file_url_is_the_local_cache(digits_cache):
    from zarr.storage import LocalStore

    cache = Cache(f"file://{Path(digits_cache).resolve()}", mode="r")
    assert not cache.is_url and isinstance(cache.root.store, LocalStore)
    assert [g.split for g in cache.groups()] == ["test", "train", "val"]


def test_unknown_or_missing_filesystem_is_named():
    import importlib.util

    with pytest.raises(CacheError, match="fsspec knows no nosuchfs://"):
        Cache("nosuchfs://bucket/x.zarr", mode="r")
    if importlib.util.find_spec("s3fs") is None:
        from backbench.errors import MissingDependency

        with pytest.raises(MissingDependency, match=r"pip install s3fs"):
            Cache("s3://bucket/x.zarr", mode="r")


# ------------------------------------------------------------------ http://


def test_probe_knn_ls_info_over_http_equal_local(served, run_cli):
    local, url = served
    probe = ["probe", "-b", B, "-d", "digits", "--train", "train", "--eval", "test", "--C", "0.01", "0.1", "--json"]
    knn = ["knn", "-b", B, "-d", "digits", "--train", "train", "--eval", "test", "-k", "10", "20", "--json"]
    for cmd in (probe, knn):
        code, remote_out, err = run_cli(*cmd, "--cache", url)  # first: nothing recorded to reuse
        assert code == 0, err
        assert err.count("results not recorded") == 1
        assert f"results not recorded: the cache at {url} is read-only" in " ".join(err.split())
        code, local_out, err = run_cli(*cmd, "--cache", local)
        assert code == 0 and "not recorded" not in err
        remote, here = json.loads(remote_out), json.loads(local_out)
        assert [r["reused"] for r in remote + here] == [False, False]
        # the arrays of per-sample outcomes are stored beside a record: only the recorded (local) run has them
        assert all("outcomes" not in r for r in remote) and all(r["outcomes"] for r in here)
        assert _strip([{k: v for k, v in r.items() if k != "outcomes"} for r in remote]) == \
            _strip([{k: v for k, v in r.items() if k != "outcomes"} for r in here])
        code, again, err = run_cli(*cmd, "--cache", url)  # the local run's record, read over HTTP
        assert code == 0 and json.loads(again)[0]["reused"] and "not recorded" not in err
        assert json.loads(again)[0]["metrics"] == here[0]["metrics"]
    for cmd in (["ls", "--json"], ["info", B, "digits", "val", "--json"], ["results", "--json"]):
        code, remote_out, err = run_cli(*cmd, "--cache", url)
        assert code == 0, err
        assert json.loads(remote_out) == json.loads(run_cli(*cmd, "--cache", local)[1])
    assert len(json.loads(remote_out)) == 2  # the probe and kNN records, listed over HTTP


def test_few_shot_over_http_notes_once(served, run_cli):
    _, url = served
    code, out, err = run_cli("knn", "-b", B, "-d", "digits", "--train", "train", "--eval", "test", "-k", "5",
                             "--shots", "1", "2", "--seeds", "2", "--cache", url, "--json")
    assert code == 0 and len(json.loads(out)) == 4
    assert err.count("results not recorded") == 1


@pytest.mark.parametrize("status", [404, 403])
def test_http_without_directory_listings_uses_the_group_index(digits_cache, run_cli, status):
    local = Path(digits_cache)
    handler = type("NoListing", (_NoListing,), {"status": status})
    server = _serve(local.parent, handler)
    url = f"http://127.0.0.1:{server.server_address[1]}/{local.name}"
    try:
        code, out, err = run_cli("ls", "--cache", url, "--json")
        assert code == 0, err
        assert json.loads(out) == json.loads(run_cli("ls", "--cache", digits_cache, "--json")[1])
        code, out, err = run_cli("knn", "-b", B, "-d", "digits", "--train", "train", "--eval", "test", "-k", "5",
                                 "--cache", url, "--json")
        assert code == 0 and json.loads(out)[0]["metrics"]["top1"] > 0.9
        code, out, _ = run_cli("results", "--cache", url, "--json")
        assert code == 0 and json.loads(out) == []  # records need listings; nothing was recorded anyway
    finally:
        server.shutdown()
        server.server_close()


def test_writing_into_http_cache_is_refused(served, run_cli):
    local, url = served
    expected = f"cache URL '{url}' is read-only (http); extract into a local path or s3://, gs://, memory://"
    extract = ["extract", RESNET, "--data", "digits", "--dataset", "digits", "--split", "test", "--limit", "8",
               "--workers", "0"]
    for where in (url, url.replace("features.zarr", "new.zarr")):  # an existing cache, and a missing one
        code, out, err = run_cli(*extract, "--cache", where)
        assert code == 1 and expected.replace("features.zarr", Path(where).name) in " ".join(err.split())
    cache = Cache(url, mode="a")
    assert cache.read_only and cache.root.store.read_only
    with pytest.raises(CacheError, match=r"is read-only \(http\)"):
        cache.create_group(B, "digits", "more", n=1, dim=1, attrs={})
    with pytest.raises(CacheError, match="^no feature cache at 'http://"):
        Cache(url.replace("features.zarr", "new.zarr"), mode="r+")
    assert not (Path(local).parent / "new.zarr").exists()
    assert sorted(p.name for p in Path(local).iterdir()) == ["fake~pixels", "zarr.json"]
