"""Clustering (k-means on cached features, MIEB's scores): against scikit-learn, streamed, CLI, battle."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.cluster import KMeans
from sklearn.datasets import make_blobs
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score, v_measure_score

import backbench
from backbench.errors import ProbeInputError
from backbench.probe.cluster import cluster_scores, kmeans_cluster
from backbench.store import Cache
from backbench.store.results import ResultsLog
from conftest import put_group

B = "fake:blobs"


def _blobs(n: int = 600, k: int = 5, d: int = 16, std: float = 2.0, seed: int = 0):
    X, y = make_blobs(n_samples=n, centers=k, n_features=d, cluster_std=std, center_box=(-10, 10), random_state=seed)
    return X.astype(np.float32), y.astype(np.int64)


@pytest.fixture
def blobs_cache(cache_path) -> str:
    X, y = _blobs()
    put_group(cache_path, B, "blobs", "test", X, y, chunk_rows=64)
    return cache_path


def _unit(X: np.ndarray) -> np.ndarray:
    return X / np.linalg.norm(X, axis=1, keepdims=True)


def test_nmi_matches_sklearn_kmeans_on_separable_blobs(blobs_cache):
    res = backbench.cluster(B, "blobs", eval="test", seeds=3, cache=blobs_cache, device="cpu")
    rec = res.record
    assert rec["task"] == "clustering" and rec["splits"] == {"eval": "test"} and not res.reused[0]
    assert rec["metrics"]["n_clusters"] == 5 and rec["metrics"]["n"] == 600
    X, y = _blobs()
    ref = KMeans(n_clusters=5, n_init=10, random_state=0).fit_predict(_unit(X))
    assert rec["metrics"]["nmi"] == pytest.approx(normalized_mutual_info_score(y, ref), abs=0.02)
    assert rec["metrics"]["nmi"] > 0.9 and rec["metrics"]["cluster_acc"] > 0.9
    again = backbench.cluster(B, "blobs", eval="test", seeds=3, cache=blobs_cache, device="cpu")
    assert again.reused == [True] and again.record["key"] == rec["key"]


def test_metrics_are_sklearns_on_the_recorded_assignments(blobs_cache):
    cache = Cache(blobs_cache)
    rec = backbench.cluster(B, "blobs", eval="test", seeds=2, cache=cache, device="cpu").record
    assignments = ResultsLog(cache).outcomes(rec)["assignments"]
    y = cache.group(B, "blobs", "test").labels()
    assert assignments.shape == (2, 600) and assignments.dtype == np.int32
    for seed, a in enumerate(assignments):
        want = {"nmi": normalized_mutual_info_score(y, a), "ari": adjusted_rand_score(y, a),
                "v_measure": v_measure_score(y, a)}
        assert {k: rec["per_seed"][seed][k] for k in want} == pytest.approx(want, abs=1e-12)
    for name in ("nmi", "ari", "v_measure", "cluster_acc"):
        values = [s[name] for s in rec["per_seed"]]
        assert rec["metrics"][name] == pytest.approx(np.mean(values))
        assert rec["metrics"][f"{name}_std"] == pytest.approx(np.std(values))


def test_cluster_accuracy_is_the_hungarian_match():
    y = np.array([0, 0, 0, 1, 1, 2, 2, 2])
    a = np.array([2, 2, 1, 0, 0, 1, 1, 1])  # 2->0, 0->1, 1->2: one row off
    assert cluster_scores(y, a)["cluster_acc"] == pytest.approx(7 / 8)
    assert cluster_scores(y, (y + 1) % 3) == pytest.approx({"nmi": 1.0, "ari": 1.0, "v_measure": 1.0,
                                                            "cluster_acc": 1.0})


def test_streamed_equals_in_memory(blobs_cache):
    cache = Cache(blobs_cache)
    kw = dict(eval="test", seeds=2, points_per_centroid=40, cache=cache, device="cpu")
    memory = backbench.cluster(B, "blobs", **kw).record
    streamed = backbench.cluster(B, "blobs", memory_limit=0, force=True, **kw).record
    assert not memory["streamed"] and streamed["streamed"] and memory["key"] == streamed["key"]
    assert memory["train_sizes"] == [200, 200]  # 40 rows per centroid, a seeded sample
    assert streamed["metrics"] == memory["metrics"]
    log = ResultsLog(cache)
    assert np.array_equal(log.outcomes(streamed)["assignments"],
                          kmeans_cluster(_blobs()[0], _blobs()[1], seeds=2, points_per_centroid=40).assignments)


def test_too_few_rows_or_classes_are_refused():
    X, y = _blobs(n=20, k=5)
    with pytest.raises(ProbeInputError, match="as many rows as clusters"):
        kmeans_cluster(X[:3], y[:3], n_clusters=5)
    with pytest.raises(ProbeInputError, match="at least 2 classes"):
        kmeans_cluster(X, np.zeros(20, dtype=int))


def test_cli_table_and_json(blobs_cache, run_cli):
    code, out, err = run_cli("cluster", "-b", B, "-d", "blobs", "--eval", "test", "--seeds", "2",
                             "--device", "cpu", "--cache", blobs_cache)
    assert code == 0, err
    assert "nmi" in out and "v_measure" in out and "k=5" in out
    code, out, _ = run_cli("cluster", "-b", B, "-d", "blobs", "--eval", "test", "--seeds", "2", "--device", "cpu",
                           "--cache", blobs_cache, "--json")
    rec = json.loads(out)
    assert code == 0 and rec["reused"] and rec["params"]["seeds"] == 2 and rec["outcomes"]["assignments"]


def test_battle_runs_it_on_every_main_dataset_and_the_leaderboard_ranks_nmi(blobs_cache):
    from backbench.battle.config import parse_config
    from backbench.battle.run import plan
    from backbench.report.leaderboard import build, main_metrics

    cfg = parse_config({"backbones": ["timm:test_resnet@random"],
                        "datasets": {"a": {"source": "digits", "splits": ["train", "test"]},
                                     "b": {"source": "digits", "splits": ["train", "test"]}},
                        "tasks": {"probe": {}, "clustering": {"seeds": 2}}})
    assert sorted(c.dataset for c in plan(cfg) if c.stage == "clustering") == ["a", "b"]
    assert main_metrics()["clustering"] == "nmi"
    rec = backbench.cluster(B, "blobs", eval="test", seeds=2, cache=blobs_cache, device="cpu").record
    lb = build([rec])
    assert lb.columns == ["clustering:blobs"] and lb.values[0, 0] == rec["metrics"]["nmi"]


def test_a_battle_request_keys_the_same_record_as_the_cli(blobs_cache):
    from backbench.tasks.base import RunOptions, get_task, run_task

    cache = Cache(blobs_cache)
    mine = backbench.cluster(B, "blobs", eval="test", seeds=2, cache=cache, device="cpu").record
    request = get_task("clustering").request(B, "blobs", {"train": "train", "eval": "test", "val": None},
                                             params={"seeds": 2})
    (rec, reused), = run_task(cache, request, RunOptions("cpu"))
    assert reused and rec["key"] == mine["key"]
