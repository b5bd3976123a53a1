"""The probe on the store: records, reuse, few-shot sampling, selection and input errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from backbench.errors import GroupNotFound, ProbeInputError
from backbench.probe.tasks import run_few_shot, run_probe, summarize_few_shot
from backbench.store.results import ResultsLog
from backbench.store import Cache
from conftest import put_group

B = "fake:pixels"
GRID = [0.001, 0.01, 0.1, 1.0]


def test_probe_record_and_reuse(digits_cache):
    cache = Cache(digits_cache)
    rec, reused = run_probe(cache, B, "digits", "train", "test", Cs=GRID)
    assert not reused and rec["task"] == "probe" and rec["chosen_C"] in GRID
    assert rec["metrics"]["top1"] > 0.9 and 0 <= rec["metrics"]["ece"] <= 1
    assert set(rec["groups"]) == {"train", "test"} and rec["params"]["selection"] == "holdout-10%"
    assert np.array(rec["metrics"]["confusion_matrix"]).sum() == 497
    assert rec["versions"]["scikit-learn"] and rec["wall_s"] > 0
    again, reused = run_probe(cache, B, "digits", "train", "test", Cs=GRID)
    assert reused and again == rec
    forced, reused = run_probe(cache, B, "digits", "train", "test", Cs=GRID, force=True)
    assert not reused and forced["key"] == rec["key"] and forced["metrics"] == rec["metrics"]
    assert len(ResultsLog(cache).records()) == 1


def test_selection_never_reads_eval(digits_cache, tmp_path):
    """Scrambling the eval labels changes the score, never the chosen C."""
    cache = Cache(digits_cache)
    rec, _ = run_probe(cache, B, "digits", "train", "test", val="val", Cs=GRID)
    test = cache.group(B, "digits", "test")
    X, y = test.features(), test.labels()
    put_group(digits_cache, B, "digits", "scrambled", X, np.random.default_rng(0).permutation(y))
    other, _ = run_probe(cache, B, "digits", "train", "scrambled", val="val", Cs=GRID)
    assert other["chosen_C"] == rec["chosen_C"] and other["params"]["selection"] == "val"
    assert other["metrics"]["top1"] < 0.3 < rec["metrics"]["top1"]


def test_few_shot_draws_k_per_class_from_train_only(digits_cache):
    cache = Cache(digits_cache)
    pairs = run_few_shot(cache, B, "digits", "train", "test", shots=[1, 4], seeds=3, Cs=GRID)
    assert len(pairs) == 6
    train_y = cache.group(B, "digits", "train").labels()
    rows = {}
    for rec, _ in pairs:
        k, idx = rec["params"]["shots"], np.array(rec["train_rows"])
        assert idx.max() < len(train_y) and np.bincount(train_y[idx], minlength=10).tolist() == [k] * 10
        rows[(k, rec["seed"])] = tuple(sorted(idx))
    assert len({rows[(4, s)] for s in range(3)}) == 3  # seeds differ
    summary = summarize_few_shot([r for r, _ in pairs])
    assert [s["shots"] for s in summary] == [1, 4] and summary[1]["top1_mean"] > summary[0]["top1_mean"] - 0.05


def test_few_shot_class_too_small_names_it(cache_path):
    X = np.random.default_rng(0).normal(size=(30, 4)).astype(np.float32)
    y = np.array([0] * 14 + [1] * 14 + [2] * 2)
    put_group(cache_path, B, "tiny", "train", X, y, ["ant", "bee", "cow"])
    put_group(cache_path, B, "tiny", "test", X, y, ["ant", "bee", "cow"])
    with pytest.raises(ProbeInputError, match="cow"):
        run_few_shot(Cache(cache_path), B, "tiny", "train", "test", shots=[4], seeds=1, Cs=GRID)


def test_errors_before_fitting(digits_cache):
    cache = Cache(digits_cache)
    with pytest.raises(GroupNotFound, match="no split 'nope'.*has: test, train, val"):
        run_probe(cache, B, "digits", "train", "nope")
    g = cache.group(B, "digits", "test")
    put_group(digits_cache, B, "digits", "renamed", g.features(), g.labels(), [f"c{i}" for i in range(10)])
    with pytest.raises(ProbeInputError, match="has classes"):
        run_probe(cache, B, "digits", "train", "renamed")
    put_group(digits_cache, B, "digits", "otherw", g.features(), g.labels(), weights_sha256="x" * 64)
    with pytest.raises(ProbeInputError, match="different weights"):
        run_probe(cache, B, "digits", "train", "otherw")
    X = g.features().copy()
    X[3, 2] = np.nan
    put_group(digits_cache, B, "digits", "nan", X, g.labels())
    with pytest.raises(ProbeInputError, match="1 of 497 rows hold NaN or inf"):
        run_probe(cache, B, "digits", "nan", "test")


def test_probe_and_results_cli(digits_cache, run_cli):
    code, out, err = run_cli("probe", "-b", B, "-d", "digits", "--train", "train", "--eval", "test",
                             "--C", "0.01", "0.1", "--cache", digits_cache)
    assert code == 0, err
    assert "top1" in out and "probe" in out
    code, out, _ = run_cli("probe", "-b", B, "-d", "digits", "--train", "train", "--eval", "test",
                           "--shots", "1", "2", "--seeds", "2", "--C", "log:-2:0:3", "--cache", digits_cache, "--json")
    recs = json.loads(out)
    assert code == 0 and [r["params"]["shots"] for r in recs] == [1, 1, 2, 2]
    assert recs[0]["params"]["Cs"] == pytest.approx([0.01, 0.1, 1.0])
    code, out, _ = run_cli("results", "--cache", digits_cache, "--json")
    assert code == 0 and len(json.loads(out)) == 5
    code, out, _ = run_cli("results", "--cache", digits_cache)
    assert "5 record(s)" in out and "top1=" in out
    code, _, err = run_cli("probe", "-b", B, "-d", "digits", "--train", "train", "--eval", "test", "--C", "x",
                           "--cache", digits_cache)
    assert code != 0 and "--C" in err
