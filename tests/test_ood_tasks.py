"""OOD detection, open-set and shift on the store: records, refusals, subset classes, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest

from backbench.errors import ProbeInputError
from backbench.probe.ood_tasks import run_ood, run_open_set, run_shift
from backbench.store import Cache
from conftest import put_group

B = "fake:pixels"


@pytest.fixture
def ood_cache(digits_cache):
    rng = np.random.default_rng(3)
    test = Cache(digits_cache).group(B, "digits", "test")
    X = test.features()
    put_group(digits_cache, B, "noise", "test", rng.normal(8, 6, (200, X.shape[1])).astype(np.float32),
              np.zeros(200, dtype=np.int64), ["noise"])
    keep = test.labels() < 3  # a shifted set with a subset of the classes, in another order
    shifted = X[keep] + rng.normal(0, 2, X[keep].shape).astype(np.float32)
    put_group(digits_cache, B, "digits_shift", "test", shifted, 2 - test.labels()[keep], ["2", "1", "0"])
    return digits_cache


def test_far_ood_is_detected_by_every_score(ood_cache):
    rec, reused = run_ood(Cache(ood_cache), B, "digits", "train", "test", ood=["noise:test"],
                          scores=["knn", "msp", "energy", "mahalanobis", "cosine"])
    m = rec["metrics"]
    assert not reused and rec["task"] == "ood" and m["primary"] == "knn" and m["auroc"] > 0.95
    for name in ("knn", "msp", "energy", "mahalanobis", "cosine"):
        s = m["scores"][name]["noise:test"]
        assert set(s) == {"auroc", "aupr_in", "aupr_out", "fpr@95tpr"} and 0 <= s["fpr@95tpr"] <= 1
        assert m["scores"][name]["mean"]["auroc"] == pytest.approx(s["auroc"])
    again, reused = run_ood(Cache(ood_cache), B, "digits", "train", "test", ood=["noise:test"],
                            scores=["knn", "msp", "energy", "mahalanobis", "cosine"])
    assert reused and again["key"] == rec["key"]


def test_ood_refuses_other_backbones_and_bad_refs(ood_cache):
    g = Cache(ood_cache).group(B, "noise", "test")
    put_group(ood_cache, B, "noise", "other", g.features(), g.labels(), ["noise"], preprocess={"input_size": [3, 9, 9]})
    with pytest.raises(ProbeInputError, match="different preprocessing"):
        run_ood(Cache(ood_cache), B, "digits", "train", "test", ood=["noise:other"], scores=["knn"])
    with pytest.raises(ProbeInputError, match="DATASET:SPLIT"):
        run_ood(Cache(ood_cache), B, "digits", "train", "test", ood=["noise"], scores=["knn"])
    with pytest.raises(ProbeInputError, match="unknown OOD score"):
        run_ood(Cache(ood_cache), B, "digits", "train", "test", ood=["noise:test"], scores=["odin"])


def test_open_set_holds_out_classes(ood_cache):
    rec, _ = run_open_set(Cache(ood_cache), B, "digits", "train", "test", holdout=["8", "9"], scores=["knn", "msp"])
    m = rec["metrics"]
    y = Cache(ood_cache).group(B, "digits", "test").labels()
    assert rec["task"] == "open-set" and m["n_ood"] == int(np.isin(y, [8, 9]).sum()) and 0.5 < m["auroc"] <= 1
    with pytest.raises(ProbeInputError, match="must be classes"):
        run_open_set(Cache(ood_cache), B, "digits", "train", "test", holdout=["cat"], scores=["knn"])


def test_shift_matches_classes_by_name(ood_cache):
    rec, _ = run_shift(Cache(ood_cache), B, ("digits", "train"), ("digits", "test"), [("digits_shift", "test")])
    m = rec["metrics"]
    s = m["shifted"]["digits_shift:test"]
    assert s["classes"] == 3 and s["mapping"] == {"2": 2, "1": 1, "0": 0}
    assert s["top1"] > 0.9 and m["id_top1"] > 0.9 and m["gap"] == pytest.approx(m["id_top1"] - s["top1"])
    put_group(ood_cache, B, "letters", "test", np.zeros((4, 64), np.float32), np.arange(4), ["a", "b", "c", "d"])
    with pytest.raises(ProbeInputError, match="classes the train split lacks"):
        run_shift(Cache(ood_cache), B, ("digits", "train"), ("digits", "test"), [("letters", "test")])


def test_ood_and_shift_cli(ood_cache, run_cli):
    code, out, err = run_cli("ood", "-b", B, "--id-dataset", "digits", "--id-train", "train", "--id-test", "test",
                             "--ood", "noise:test", "--open-set", "9", "--scores", "knn", "msp", "--cache", ood_cache)
    assert code == 0, err
    assert "auroc" in out and "open-set" in out and "noise:test" in out
    code, out, err = run_cli("shift", "-b", B, "--train", "digits:train", "--eval", "digits:test",
                             "--shifted", "digits_shift:test", "--cache", ood_cache, "--json")
    assert code == 0, err
    assert json.loads(out)["metrics"]["shifted"]["digits_shift:test"]["classes"] == 3
    code, _, err = run_cli("ood", "-b", B, "--id-dataset", "digits", "--id-train", "train", "--id-test", "test",
                           "--cache", ood_cache)
    assert code != 0 and "--ood" in err
