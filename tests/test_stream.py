"""Caches bigger than memory: every probe run with a memory limit below its cache's size
reads the cache chunk by chunk and gives the in-memory result."""

from __future__ import annotations

import json

import numpy as np
import pytest

from backbench.errors import BackbenchError
from backbench.probe.data import load_split
from backbench.probe.linear import select_and_fit
from backbench.probe.neighbour_tasks import run_knn, run_retrieval
from backbench.probe.ood_tasks import run_ood
from backbench.probe.stream import GroupRows, parse_size
from backbench.probe.tasks import run_few_shot, run_probe
from backbench.store import Cache
from conftest import digits_pixels, put_group

B = "fake:pixels"


@pytest.fixture
def cache(cache_path) -> Cache:
    """Digits pixels in chunks of 96 rows; a few train rows were skipped at extraction (-1)."""
    X, y, parts = digits_pixels()
    for split, rows in parts.items():
        labels = y[rows].copy()
        if split == "train":
            labels[[5, 97, 500]] = -1
        put_group(cache_path, B, "digits", split, X[rows], labels, [str(c) for c in range(10)], chunk_rows=96)
    noise = np.random.default_rng(2).uniform(0, 16, (300, 64)).astype(np.float32)
    put_group(cache_path, B, "noise", "test", noise, np.zeros(300, dtype=np.int64), ["0"], chunk_rows=96)
    return Cache(cache_path, mode="r+")


def test_group_rows_reads_like_the_array(cache):
    full = load_split(cache, B, "digits", "train", memory_limit=1 << 40)
    lazy = load_split(cache, B, "digits", "train", memory_limit=0)
    assert isinstance(lazy.X, GroupRows) and lazy.X.shape == full.X.shape == (997, 64)
    np.testing.assert_array_equal(lazy.y, full.y)
    np.testing.assert_array_equal(lazy.X[90:300], full.X[90:300])
    pick = np.array([0, 95, 96, 500, 996])
    np.testing.assert_array_equal(lazy.X[pick], full.X[pick])
    np.testing.assert_array_equal(np.concatenate([b for _, b in lazy.X.blocks()]), full.X)
    np.testing.assert_array_equal(lazy.X.subset(pick)[:], full.X[pick])


def test_streamed_linear_probe_matches_in_memory(cache):
    """Full-batch L-BFGS over chunks: the same C, the same predictions, weights within 1e-3."""
    tr = load_split(cache, B, "digits", "train", memory_limit=1 << 40)
    lazy = load_split(cache, B, "digits", "train", memory_limit=0)
    m1, s1 = select_and_fit(tr.X, tr.y, [0.01, 0.1, 1.0])
    m2, s2 = select_and_fit(lazy.X, lazy.y, [0.01, 0.1, 1.0])
    assert s1.best_C == s2.best_C and s1.val_accuracy == pytest.approx(s2.val_accuracy, abs=2e-3)
    np.testing.assert_allclose(m2.coef_, m1.coef_, rtol=1e-3, atol=1e-3 * np.abs(m1.coef_).max())
    te = load_split(cache, B, "digits", "test")
    assert (m1.predict(te.X) == m2.predict(te.X)).mean() >= 0.995


def test_probe_knn_ood_records_match_with_a_memory_limit(cache):
    probe, _ = run_probe(cache, B, "digits", "train", "test", val="val", Cs=[0.01, 0.1, 1.0], memory_limit=1 << 40)
    fews = run_few_shot(cache, B, "digits", "train", "test", shots=[2], seeds=1, Cs=[0.1, 1.0], memory_limit=1 << 40)
    knn = run_knn(cache, B, "digits", "train", "test", ks=[5, 20], memory_limit=1 << 40)[0][0]
    ood, _ = run_ood(cache, B, "digits", "train", "test", ood=["noise:test"],
                     scores=["mahalanobis", "knn", "vim", "energy", "cosine"], memory_limit=1 << 40)
    ret, _ = run_retrieval(cache, B, "digits", "test", "train", ks=[1, 5], memory_limit=1 << 40)
    probe_s, _ = run_probe(cache, B, "digits", "train", "test", val="val", Cs=[0.01, 0.1, 1.0], force=True, memory_limit="1KB")
    fews_s = run_few_shot(cache, B, "digits", "train", "test", shots=[2], seeds=1, Cs=[0.1, 1.0], force=True, memory_limit="1KB")
    knn_s = run_knn(cache, B, "digits", "train", "test", ks=[5, 20], force=True, memory_limit="1KB")[0][0]
    ood_s, _ = run_ood(cache, B, "digits", "train", "test", ood=["noise:test"],
                       scores=["mahalanobis", "knn", "vim", "energy", "cosine"], force=True, memory_limit="1KB")
    ret_s, _ = run_retrieval(cache, B, "digits", "test", "train", ks=[1, 5], force=True, memory_limit="1KB")
    assert probe_s["chosen_C"] == probe["chosen_C"]
    assert probe_s["metrics"]["top1"] == pytest.approx(probe["metrics"]["top1"], abs=2e-3)
    assert fews_s[0][0]["metrics"]["top1"] == pytest.approx(fews[0][0]["metrics"]["top1"], abs=1e-9)
    assert knn_s["metrics"] == pytest.approx(knn["metrics"], abs=1e-9)
    for score, m in ood["metrics"]["scores"].items():
        assert ood_s["metrics"]["scores"][score]["mean"]["auroc"] == pytest.approx(m["mean"]["auroc"], abs=2e-3), score
    assert ret_s["metrics"] == pytest.approx(ret["metrics"], abs=1e-6)


def test_cli_memory_limit_gives_the_same_probe(cache, run_cli):
    args = ["probe", "-b", B, "-d", "digits", "--train", "train", "--eval", "test", "--C", "0.1", "1",
            "--cache", cache.path, "--json"]
    code, out, _ = run_cli(*args)
    code_s, out_s, _ = run_cli(*args, "--memory-limit", "0", "--force")
    assert code == code_s == 0
    a, b = json.loads(out)[0], json.loads(out_s)[0]
    assert a["chosen_C"] == b["chosen_C"] and a["metrics"]["top1"] == pytest.approx(b["metrics"]["top1"], abs=2e-3)
    code, _, err = run_cli(*args, "--memory-limit", "lots")
    assert code == 1 and "--memory-limit 'lots': give a size such as 8GB" in err


def test_parse_size():
    assert parse_size("2GB") == 2 * 1024**3 and parse_size("500m") == 500 * 1024**2
    assert parse_size("1.5 GiB") == int(1.5 * 1024**3) and parse_size("0") == 0 and parse_size(123) == 123
    with pytest.raises(BackbenchError, match="give a size"):
        parse_size("-1GB")
