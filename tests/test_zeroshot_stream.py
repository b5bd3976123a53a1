"""Zero-shot streams its eval split from the cache above the memory limit, by row blocks, with the
same metrics and outcomes as in memory."""

from __future__ import annotations

import sys

import numpy as np
import pytest

import backbench
from backbench.extract.run import extract
from backbench.probe.stream import GroupRows
from backbench.probe.zeroshot import zeroshot_logits, zeroshot_metrics, zeroshot_ranking
from backbench.store import Cache
from backbench.store.results import ResultsLog

CLIP = "open_clip:ViT-S-32@random"
TEMPLATES = ["a photo of a {c}.", "art of a {c}"]


@pytest.fixture(scope="module")
def chunked(tmp_path_factory):
    """Random open_clip image embeddings of 12 images in chunks of 4 rows."""
    from conftest import write_image

    root = tmp_path_factory.mktemp("zss")
    for c, name in enumerate(["cat", "dog", "eel"]):
        for i in range(4):
            write_image(root / "images" / name / f"{i}.png", seed=10 * c + i)
    path = str(root / "f.zarr")
    extract(CLIP, f"imagefolder:{root / 'images'}", cache=path, dataset="toy", split="test", workers=0,
            dtype="float32", device="cpu", chunk_rows=4)
    return path


def test_the_ranking_by_blocks_equals_a_whole_argsort():
    rng = np.random.default_rng(0)
    X, C = rng.normal(size=(23, 8)), rng.normal(size=(6, 8))
    C /= np.linalg.norm(C, axis=1, keepdims=True)
    whole = np.argsort(-zeroshot_logits(X, C), axis=1, kind="stable")
    for rows in (1, 5, 23, 100):
        np.testing.assert_array_equal(zeroshot_ranking(X, C, 5, block_rows=rows), whole[:, :5])
    assert zeroshot_ranking(X, C[:3], 5).shape == (23, 3)  # k clipped to the classes


def test_a_low_memory_limit_streams_and_gives_identical_metrics(chunked, monkeypatch):
    module = sys.modules["backbench.probe.zeroshot"]
    seen = []
    real = module.zeroshot_ranking

    def spy(X, C, k, block_rows=5):  # blocks of 5 rows across the cache's chunks of 4
        seen.append(type(X))
        return real(X, C, k, block_rows=block_rows)

    monkeypatch.setattr(module, "zeroshot_ranking", spy)
    opts = dict(eval="test", templates=TEMPLATES, cache=chunked, device="cpu", force=True)
    memory = backbench.zeroshot(CLIP, "toy", memory_limit="8GB", **opts).record
    streamed = backbench.zeroshot(CLIP, "toy", memory_limit=0, **opts).record
    assert seen == [np.ndarray, GroupRows]
    assert streamed["metrics"] == memory["metrics"] and streamed["key"] == memory["key"]
    log = ResultsLog(Cache(chunked))
    a, b = log.outcomes(memory), log.outcomes(streamed)
    assert set(a) >= {"correct", "predicted"} and all(np.array_equal(a[k], b[k]) for k in a)
    # and both equal the whole-matrix reference on the same embeddings
    group = Cache(chunked).group(CLIP, "toy", "test")
    X, y = group.read_labeled(dtype=np.float32)
    from backbench.extract.text import text_group_path
    from backbench.store.group import FeatureGroup

    T = FeatureGroup(Cache(chunked).root[text_group_path(CLIP, memory["text_group"])]).read_labeled(dtype=np.float32)
    ref, _ = zeroshot_metrics(zeroshot_logits(X, T[0]), y)
    assert {k: streamed["metrics"][k] for k in ref} == ref
