"""Issue 18 (6): a k larger than the kNN gallery is reported as the k actually used, never as
``top1@{k asked}``: in the CLI, in few-shot kNN and in the battle."""

from __future__ import annotations

import json

import numpy as np
import pytest

from backbench.store import Cache

B = "fake:pixels"


def dino_top1(train_X: np.ndarray, train_y: np.ndarray, eval_X: np.ndarray, eval_y: np.ndarray, k: int,
              temperature: float = 0.07) -> float:
    """DINO's weighted vote written out with numpy (the reference): cosine top-k, exp(sim / T)."""
    a = train_X / np.linalg.norm(train_X, axis=1, keepdims=True)
    q = eval_X / np.linalg.norm(eval_X, axis=1, keepdims=True)
    sims = q.astype(np.float64) @ a.T.astype(np.float64)
    top = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    w = np.exp((np.take_along_axis(sims, top, 1) - sims.max(1, keepdims=True)) / temperature)
    votes = np.zeros((len(q), int(train_y.max()) + 1))
    for c in range(votes.shape[1]):
        votes[:, c] = (w * (train_y[top] == c)).sum(1)
    return float(np.mean(votes.argmax(1) == eval_y))


def _split(cache_path: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    g = Cache(cache_path, mode="r").group(B, "digits", split)
    return g.features().astype(np.float32), g.labels()


def test_cli_k_beyond_the_gallery_is_reported_as_the_k_used(digits_cache, run_cli):
    code, out, err = run_cli("knn", "-b", B, "-d", "digits", "--train", "val", "--eval", "test", "-k", "10",
                             "100000", "--cache", digits_cache)
    assert code == 0, err
    assert "top1@100000" not in out and "top1@300" in out and "top1@10" in out
    assert "k=100000 as top1@300" in err
    code, out, _ = run_cli("knn", "-b", B, "-d", "digits", "--train", "val", "--eval", "test", "-k", "10",
                           "100000", "--cache", digits_cache, "--json")
    rec = json.loads(out)[0]
    m = rec["metrics"]
    assert rec["ks_used"] == [10, 300] and rec["k_clipped"] == {"100000": 300} and "top1@100000" not in m
    (tx, ty), (ex, ey) = _split(digits_cache, "val"), _split(digits_cache, "test")
    assert m["top1@300"] == pytest.approx(dino_top1(tx, ty, ex, ey, 300), abs=1e-12)
    assert m["top1@10"] == pytest.approx(dino_top1(tx, ty, ex, ey, 10), abs=1e-12)
    assert m["main_k"] == 10 and m["top1"] == m["top1@10"]


def test_few_shot_galleries_clip_each_k(digits_cache, run_cli):
    code, out, err = run_cli("knn", "-b", B, "-d", "digits", "--train", "train", "--eval", "test", "-k", "5", "20",
                             "--shots", "1", "--seeds", "1", "--cache", digits_cache, "--json")
    assert code == 0, err
    rec = json.loads(out)[0]  # 1 shot x 10 classes: a gallery of 10 rows
    m = rec["metrics"]
    assert rec["ks_used"] == [5, 10] and rec["k_clipped"] == {"20": 10} and m["main_k"] == 10
    assert "top1@20" not in m and m["top1"] == m["top1@10"]


def test_battle_reports_the_k_used(tmp_path):
    from backbench.battle.config import parse_config
    from backbench.battle.run import run_battle
    from backbench.store.results import ResultsLog

    raw = {"backbones": ["timm:test_resnet@random"], "workers": 0,
           "datasets": {"digits": {"source": "digits", "splits": ["train", "test"], "limit": 40}},
           "tasks": {"knn": {"k": [5, 100000]}}}
    cache = Cache(str(tmp_path / "b.zarr"))
    summary = run_battle(parse_config(raw), cache)
    assert not summary.failed, [r.message for r in summary.failed]
    (rec,) = ResultsLog(cache).records()
    m = rec["metrics"]
    assert rec["ks_used"] == [5, 40] and rec["k_clipped"] == {"100000": 40} and "top1@100000" not in m
    g = {s: cache.group("timm:test_resnet@random", "digits", s) for s in ("train", "test")}
    ref = dino_top1(g["train"].features().astype(np.float32), g["train"].labels(),
                    g["test"].features().astype(np.float32), g["test"].labels(), 40)
    assert m["top1@40"] == pytest.approx(ref, abs=1e-12)
