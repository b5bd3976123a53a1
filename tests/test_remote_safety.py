"""Issue 18, item 10: caches served over HTTP. Names are decoded once and listed once, a name
that points outside the cache is never fetched, and a listing makes a bounded number of
requests. A real local HTTP server (127.0.0.1) that records every request it is sent."""

from __future__ import annotations

import functools
import http.server
import json
import threading
from pathlib import Path

import numpy as np
import pytest
import zarr

from backbench.errors import CacheError
from backbench.store import Cache
from backbench.store.remote import inside
from conftest import put_group

pytest.importorskip("aiohttp")

B = "fake:pixels"


class _Recording(http.server.SimpleHTTPRequestHandler):
    """Serves a folder; records each request's path; ``pages`` replaces some directory listings."""

    requests: list[str]
    pages: dict[str, str]

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        self.requests.append(self.path)
        if self.path in self.pages:
            body = self.pages[self.path].encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        super().do_GET()


@pytest.fixture
def server(tmp_path):
    """(folder served, base URL, the requests seen, listing pages to fake)."""
    root = tmp_path / "srv"
    root.mkdir()
    seen: list[str] = []
    pages: dict[str, str] = {}
    handler = type("H", (_Recording,), {"requests": seen, "pages": pages})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(root)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}", seen, pages
    httpd.shutdown()
    httpd.server_close()


def _toy(path: Path, backbone: str = B, splits=("train", "test"), n: int = 40) -> None:
    rng = np.random.default_rng(0)
    for split in splits:
        put_group(str(path), backbone, "toy", split, rng.normal(size=(n, 4)).astype(np.float32),
                  np.arange(n) % 2, chunk_rows=16)


def _decoy(root: Path) -> None:
    """A group beside the cache (outside it) that would list fine if a name reached it."""
    _toy(root / "x.zarr", "fake:outside", splits=("train",))
    node = zarr.open_group(str(root / "x.zarr"), mode="r")["fake~outside/toy/train"]
    Path(root, "y", "z").mkdir(parents=True)
    for name in ("zarr.json",):  # /y/z/zarr.json: a group whose attributes name a backbone
        Path(root, "y", "z", name).write_text(json.dumps({"zarr_format": 3, "node_type": "group",
                                                           "attributes": dict(node.attrs)}))


def _outside(requests: list[str]) -> list[str]:
    return [r for r in requests if not r.startswith("/c.zarr")]


def test_names_with_at_are_listed_once(server, run_cli):
    root, base, seen, _ = server
    _toy(root / "c.zarr", "timm:resnet18@random")
    code, out, err = run_cli("ls", "--cache", f"{base}/c.zarr", "--json")
    assert code == 0, err
    rows = json.loads(out)
    assert [r["path"] for r in rows] == ["timm~resnet18@random/toy/test", "timm~resnet18@random/toy/train"]
    assert [r["rows_done"] for r in rows] == [40, 40]
    assert json.loads(run_cli("ls", "--cache", str(root / "c.zarr"), "--json")[1]) == rows  # as the local cache


def test_hostile_index_entries_are_never_fetched(server, run_cli):
    root, base, seen, _ = server
    _toy(root / "c.zarr")
    _decoy(root)
    attrs = zarr.open_group(str(root / "c.zarr"), mode="r+").attrs
    attrs["backbench_groups"] = [*attrs["backbench_groups"], "../y/z", "%2e%2e/y/z", "..%2Fy/z/w", "/y/z/w",
                                 "a\\..\\y/z/w", "%252e%252e/y/z", "fake~pixels//train", 42,
                                 "fake~pixels%2Ftoy/train/x"]
    code, out, err = run_cli("ls", "--cache", f"{base}/c.zarr", "--json")
    assert code == 0, err
    assert [r["path"] for r in json.loads(out)] == ["fake~pixels/toy/test", "fake~pixels/toy/train"]
    assert "ignored 9 name(s) that are not group paths inside the cache" in " ".join(err.split())
    assert len(err.strip().splitlines()) == 1 and err.startswith("note:")
    assert _outside(seen) == []  # nothing outside /c.zarr was asked for


def test_hostile_directory_listing_is_never_followed(server, run_cli):
    root, base, seen, pages = server
    _toy(root / "c.zarr")
    _decoy(root)
    pages["/c.zarr/"] = ("<html><body><a href='fake~pixels/'>ok</a><a href='../'>up</a><a href='%2e%2e/'>up</a>"
                         "<a href='..%2fy/'>up</a><a href='/y/'>abs</a><a href='a%5c..%5cy/'>bs</a>"
                         "<a href='zarr.json'>meta</a></body></html>")
    pages["/c.zarr/fake~pixels/"] = "<a href='toy/'>toy</a><a href='%2e%2e/%2e%2e/y/'>up</a>"
    code, out, err = run_cli("ls", "--cache", f"{base}/c.zarr", "--json")
    assert code == 0, err
    assert [r["path"] for r in json.loads(out)] == ["fake~pixels/toy/test", "fake~pixels/toy/train"]
    assert "ignored" in err and "'%2e%2e/'" in err
    assert _outside(seen) == []


def test_an_index_of_many_groups_is_refused_in_a_few_requests(server, run_cli):
    root, base, seen, _ = server
    _toy(root / "c.zarr")
    zarr.open_group(str(root / "c.zarr"), mode="r+").attrs["backbench_groups"] = [
        f"fake~pixels/toy/s{i}" for i in range(50_000)]
    code, _, err = run_cli("ls", "--cache", f"{base}/c.zarr")
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert "would take more than 10000 requests" in err and "BACKBENCH_REMOTE_LIST_REQUESTS" in err
    assert len(seen) < 20  # refused from the index itself, before the groups were asked for


def test_a_group_claiming_a_huge_number_of_chunks_is_refused_before_its_markers(server, run_cli):
    root, base, seen, _ = server
    _toy(root / "c.zarr")
    meta = root / "c.zarr" / "fake~pixels" / "toy" / "train" / "chunk_checksum" / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["shape"] = [1_000_000]
    meta.write_text(json.dumps(doc))
    group = zarr.open_group(str(root / "c.zarr" / "fake~pixels" / "toy" / "train"), mode="r+")
    group.attrs.update({"n": 16_000_000, "n_chunks": 1_000_000})
    code, _, err = run_cli("ls", "--cache", f"{base}/c.zarr")
    assert code == 1 and "fake~pixels/toy/train's chunk markers" in err and "1000000" in err
    assert len(seen) < 50


def test_the_budget_can_be_raised_and_a_normal_cache_fits_it(server, run_cli, monkeypatch):
    root, base, seen, _ = server
    _toy(root / "c.zarr", splits=[f"s{i}" for i in range(30)])
    code, out, err = run_cli("ls", "--cache", f"{base}/c.zarr", "--json")
    assert code == 0 and len(json.loads(out)) == 30, err
    monkeypatch.setenv("BACKBENCH_REMOTE_LIST_REQUESTS", "20")
    code, _, err = run_cli("ls", "--cache", f"{base}/c.zarr")
    assert code == 1 and "more than 20 requests" in err
    monkeypatch.setenv("BACKBENCH_REMOTE_LIST_REQUESTS", "lots")
    code, _, err = run_cli("ls", "--cache", f"{base}/c.zarr")
    assert code == 1 and "must be a whole number" in err


def test_no_request_leaves_the_cache_url(server):
    """The filesystem itself refuses a URL outside the cache, whatever asked for it."""
    from zarr.core.sync import sync

    root, base, seen, _ = server
    _toy(root / "c.zarr")
    cache = Cache(f"{base}/c.zarr", mode="r")
    fs = cache.root.store.fs
    for url in (f"{base}/c.zarr/../y/z/zarr.json", f"{base}/c.zarr/%2e%2e/y/z/zarr.json", f"{base}/y/z/zarr.json",
                f"{base}/c.zarr2/zarr.json", "http://example.invalid/c.zarr/zarr.json"):
        with pytest.raises(CacheError, match="outside the cache"):
            sync(fs._cat_file(url))
    assert _outside(seen) == []
    assert sync(fs._cat_file(f"{base}/c.zarr/zarr.json"))  # inside: fetched as before


@pytest.mark.parametrize("url, ok", [
    ("http://h:1/c.zarr", True), ("http://h:1/c.zarr/a/b/zarr.json", True), ("http://h:1/c.zarr/t~r%40x/zarr.json", True),
    ("http://h:1/c.zarr/../x", False), ("http://h:1/c.zarr/%2e%2e/x", False), ("http://h:1/c.zarr/a%2F..%2F..%2Fx", False),
    ("http://h:1/c.zarr/%252e%252e/x", False), ("http://h:1/c.zarr/a%5C..%5Cx", False), ("http://h:1/c.zarrx/a", False),
    ("http://h:2/c.zarr/a", False), ("https://h:1/c.zarr/a", False), ("http://h:1/c.zarr/./a", False),
])
def test_inside(url, ok):
    assert inside(url, "http://h:1/c.zarr") is ok
