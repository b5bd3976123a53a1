"""Multi-label CSVs (--labels) and the one-vs-rest probe scored by mean AUROC (as BoB on CheXpert)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import StandardScaler

from backbench.errors import DataSourceError, ProbeInputError
from backbench.extract.datasets import open_source
from backbench.probe.multilabel import fit_multilabel, label_matrix
from backbench.probe.neighbour_tasks import run_knn
from backbench.probe.tasks import run_probe
from backbench.store import Cache
from conftest import put_group, write_image

LABELS = ["small", "odd", "round"]  # of a digit: < 5, odd, one of 0 6 8 9


def _targets(y):
    return np.stack([y < 5, y % 2 == 1, np.isin(y, [0, 6, 8, 9])], 1).astype(np.int8)


def test_multilabel_csv_reads_bitmasks(tmp_path):
    rows = [("a.png", "1", "0", "-1"), ("b.png", "0", "1.0", ""), ("c.png", "1", "1", "1")]
    for i, (p, *_) in enumerate(rows):
        write_image(tmp_path / p, i)
    (tmp_path / "l.csv").write_text("path,small,odd,round\n" + "\n".join(",".join(r) for r in rows))
    src = open_source(f"csv:{tmp_path / 'l.csv'}", "train", labels=["small", "odd", "round"])
    assert src.multilabel and src.classes == LABELS
    np.testing.assert_array_equal(label_matrix(src.labels, 3), [[1, 0, 0], [0, 1, 0], [1, 1, 1]])
    same = open_source(f"csv:{tmp_path / 'l.csv'}?labels=small,odd,round", "train")
    assert same.fingerprint() == src.fingerprint() != open_source(f"csv:{tmp_path / 'l.csv'}?labels=*", "x",
                                                                  labels=["small"]).fingerprint()
    with pytest.raises(DataSourceError, match="lacks column.*oval"):
        open_source(f"csv:{tmp_path / 'l.csv'}", "train", labels=["oval"])
    with pytest.raises(DataSourceError, match="works with csv: sources"):
        open_source("digits", "train", labels=["x"])


def test_one_vs_rest_matches_scikit_learn():
    X, y = load_digits(return_X_y=True)
    X = X.astype(np.float32)
    Y = _targets(y)
    models, sweep = fit_multilabel(X[:1000], Y[:1000], [0.1], X_val=X[1000:1300], Y_val=Y[1000:1300])
    assert sweep["best_C"] == 0.1
    Xs = StandardScaler().fit(X[:1300])
    for k, m in models.items():
        ref = LogisticRegression(C=0.1, max_iter=5000, tol=1e-8).fit(Xs.transform(X[:1300]), Y[:1300, k])
        ours = roc_auc_score(Y[1300:, k], m.predict_proba(X[1300:])[:, 1])
        theirs = roc_auc_score(Y[1300:, k], ref.predict_proba(Xs.transform(X[1300:]))[:, 1])
        assert ours == pytest.approx(theirs, abs=2e-3)


def test_multilabel_probe_records_mean_auroc(cache_path, run_cli):
    X, y = load_digits(return_X_y=True)
    X = X.astype(np.float32)
    masks = (_targets(y).astype(np.int64) << np.arange(3)).sum(1)
    for split, rows in (("train", slice(0, 1000)), ("test", slice(1000, None))):
        put_group(cache_path, "fake:pixels", "digits3", split, X[rows], masks[rows], LABELS, multilabel=True)
    cache = Cache(cache_path, mode="r+")
    rec, reused = run_probe(cache, "fake:pixels", "digits3", "train", "test", Cs=[0.01, 0.1, 1.0])
    m = rec["metrics"]
    assert rec["task"] == "probe-multilabel" and not reused and m["labels_scored"] == LABELS
    assert m["mean_auroc"] == pytest.approx(np.mean(list(m["auroc"].values()))) and m["mean_auroc"] > 0.9
    with pytest.raises(ProbeInputError, match="multi-label.*one label per image"):
        run_knn(cache, "fake:pixels", "digits3", "train", "test", ks=[5])
    code, out, err = run_cli("probe", "-b", "fake:pixels", "-d", "digits3", "--train", "train", "--eval", "test",
                             "--C", "0.01", "0.1", "1", "--cache", cache_path, "--json")
    assert code == 0, err
    assert json.loads(out)[0]["reused"] is True
    code, out, err = run_cli("probe", "-b", "fake:pixels", "-d", "digits3", "--train", "train", "--eval", "test",
                             "--C", "0.1", "--cache", cache_path)
    assert code == 0 and "mean_auroc" in out, out + err


def test_cli_extracts_a_multilabel_csv(tmp_path, cache_path, run_cli):
    lines = ["path,small,odd,round"]
    for i in range(12):
        write_image(tmp_path / f"{i}.png", i)
        lines.append(f"{i}.png,{int(i < 5)},{i % 2},{int(i in (0, 6, 8, 9))}")
    (tmp_path / "l.csv").write_text("\n".join(lines))
    code, _, err = run_cli("extract", "timm:test_resnet@random", "--data", f"csv:{tmp_path / 'l.csv'}",
                           "--labels", "small", "odd", "round", "--dataset", "m", "--split", "train", "--workers", "0",
                           "--cache", cache_path)
    assert code == 0, err
    g = Cache(cache_path, mode="r").group("timm:test_resnet@random", "m", "train")
    assert g.attrs["multilabel"] is True and g.classes == LABELS
    np.testing.assert_array_equal(label_matrix(g.labels(), 3)[:, 1], np.arange(12) % 2)
