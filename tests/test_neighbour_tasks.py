"""kNN and retrieval on the store: records, reuse, few-shot, self-exclusion, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.neighbors import KNeighborsClassifier

from backbench.errors import ProbeInputError
from backbench.probe.neighbour_tasks import run_knn, run_retrieval
from backbench.store import Cache
from conftest import put_group

B = "fake:pixels"


def test_knn_record_matches_sklearn_majority_at_k1(digits_cache):
    cache = Cache(digits_cache)
    (rec, reused), = run_knn(cache, B, "digits", "train", "test", ks=[1, 20])
    assert not reused and rec["task"] == "knn" and rec["params"]["ks"] == [1, 20]
    tr, te = cache.group(B, "digits", "train"), cache.group(B, "digits", "test")
    ref = KNeighborsClassifier(1, metric="cosine", algorithm="brute").fit(tr.features(), tr.labels())
    assert rec["metrics"]["top1@1"] == pytest.approx(ref.score(te.features(), te.labels()), abs=2 / 497)
    assert rec["metrics"]["top1"] == rec["metrics"]["top1@20"] > 0.9
    (again, reused), = run_knn(cache, B, "digits", "train", "test", ks=[20, 1])
    assert reused and again["key"] == rec["key"]


def test_knn_few_shot_uses_train_only(digits_cache):
    pairs = run_knn(Cache(digits_cache), B, "digits", "train", "test", ks=[1, 3], shots=[2], seeds=2)
    assert [r["task"] for r, _ in pairs] == ["knn-fewshot"] * 2
    y = Cache(digits_cache).group(B, "digits", "train").labels()
    for rec, _ in pairs:
        assert np.bincount(y[rec["train_rows"]], minlength=10).tolist() == [2] * 10
    assert pairs[0][0]["train_rows"] != pairs[1][0]["train_rows"]


def test_retrieval_same_split_excludes_self(digits_cache):
    rec, _ = run_retrieval(Cache(digits_cache), B, "digits", "test", "test", ks=[1, 5])
    m = rec["metrics"]
    assert rec["task"] == "retrieval" and 0.8 < m["precision@1"] <= 1 and 0 < m["mAP"] <= 1
    # with self included, precision@1 would be exactly 1.0
    assert m["precision@1"] < 1.0 and m["MRR"] >= m["precision@1"]


def test_retrieval_other_gallery_and_ivf(digits_cache):
    cache = Cache(digits_cache)
    flat, _ = run_retrieval(cache, B, "digits", "test", "train", ks=[1, 10])
    ivf, _ = run_retrieval(cache, B, "digits", "test", "train", ks=[1, 10], index="ivf")
    assert flat["metrics"]["recall_vs_exact"] == 1.0 and 0 < ivf["metrics"]["recall_vs_exact"] <= 1
    assert flat["key"] != ivf["key"]


def test_retrieval_refuses_other_weights(digits_cache):
    g = Cache(digits_cache).group(B, "digits", "test")
    put_group(digits_cache, B, "digits", "other", g.features(), g.labels(), weights_sha256="z" * 64)
    with pytest.raises(ProbeInputError, match="different weights"):
        run_retrieval(Cache(digits_cache), B, "digits", "test", "other")


def test_knn_and_retrieve_cli(digits_cache, run_cli):
    code, out, err = run_cli("knn", "-b", B, "-d", "digits", "--train", "train", "--eval", "test", "-k", "5", "20",
                             "--cache", digits_cache)
    assert code == 0, err
    assert "top1@5" in out and "top1@20" in out
    code, out, _ = run_cli("retrieve", "-b", B, "-d", "digits", "--query", "test", "--gallery", "train",
                           "--ks", "1", "5", "--cache", digits_cache, "--json")
    rec = json.loads(out)
    assert code == 0 and rec["task"] == "retrieval" and "precision@5" in rec["metrics"]
    code, _, err = run_cli("retrieve", "-b", B, "-d", "digits", "--query", "test", "--gallery", "train",
                           "--index", "lsh", "--cache", digits_cache)
    assert code != 0 and "--index 'lsh'" in err
