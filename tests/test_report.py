"""Leaderboard aggregation against a hand-computed table, and the rendered report."""

from __future__ import annotations

import base64
import csv
import io
import json
from html.parser import HTMLParser

import numpy as np
import pytest

from backbench.report.leaderboard import build, zscores
from backbench.report.render import figures, to_csv, to_html, to_json, to_markdown


def rec(backbone, task, dataset, value, metric="top1", created="2026-01-01", **params):
    return {"task": task, "backbone": backbone, "dataset": dataset, "metrics": {metric: value},
            "params": params, "seed": params.pop("seed", 0) if "seed" in params else 0, "created": created,
            "cache": "x.zarr", "versions": {"backbench": "0.1.0", "torch": "2", "timm": "1"}}


RECORDS = [
    rec("a", "probe", "d1", 0.9), rec("b", "probe", "d1", 0.8), rec("c", "probe", "d1", 0.7),
    rec("a", "retrieval", "d1", 0.2, "mAP"), rec("b", "retrieval", "d1", 0.6, "mAP"),
    rec("c", "retrieval", "d1", 0.5, "mAP"),
    rec("a", "probe", "d2", 0.5), rec("b", "probe", "d2", 0.5), rec("c", "probe", "d2", 0.5),
]


def test_zscores_hand_computed():
    lb = build(RECORDS)
    assert lb.backbones == ["a", "b", "c"] and lb.tasks == ["probe", "retrieval"]
    s = np.sqrt(2 / 3) * 0.1  # population std of (0.9, 0.8, 0.7)
    # probe: d1 z = (+0.1, 0, -0.1)/s ; d2 constant -> 0 ; task z = mean of the two
    np.testing.assert_allclose(lb.task_z[:, 0], np.array([0.1, 0, -0.1]) / s / 2, atol=1e-12)
    r = np.array([0.2, 0.6, 0.5])
    np.testing.assert_allclose(lb.task_z[:, 1], (r - r.mean()) / r.std(), atol=1e-12)
    agg = (lb.task_z[:, 0] + lb.task_z[:, 1]) / 2
    np.testing.assert_allclose(lb.aggregate, agg)
    assert lb.rank.tolist() == [3, 1, 2]  # b: (0 + 0.98)/2; c: (-0.61 + 0.39)/2; a: (0.61 - 1.37)/2
    assert [r["backbone"] for r in lb.rows()] == ["b", "c", "a"]


def test_spearman_between_tasks():
    lb = build(RECORDS)
    # probe order a > b > c, retrieval order b > c > a: d = (2, -1, -1) -> rho = 1 - 6*6/24 = -0.5
    assert lb.spearman[0, 1] == pytest.approx(-0.5)
    assert lb.spearman[0, 0] == pytest.approx(1.0)


def test_zscores_keep_missing_as_nan():
    z = zscores(np.array([[1.0, np.nan], [3.0, 2.0], [5.0, 2.0]]))
    np.testing.assert_allclose(z[:, 0], [-1.224744871, 0, 1.224744871])
    assert np.isnan(z[0, 1]) and z[1, 1] == 0


def test_newest_record_wins_and_fewshot_curves():
    recs = [rec("a", "probe", "d", 0.1, created="2026-01-01"), rec("a", "probe", "d", 0.3, created="2026-02-01")]
    recs += [rec("a", "fewshot", "d", v, shots=k, seed=s) for k, v, s in [(1, 0.2, 0), (1, 0.4, 1), (4, 0.8, 0)]]
    lb = build(recs)
    assert lb.values[0, lb.columns.index("probe:d")] == pytest.approx(0.3)
    assert lb.fewshot["a"] == {1: pytest.approx(0.3), 4: pytest.approx(0.8)}


def test_renderers():
    lb = build(RECORDS)
    md = to_markdown(lb)
    assert md.splitlines()[0].startswith("| rank | backbone | z_mean") and "Spearman" in md
    rows = list(csv.DictReader(io.StringIO(to_csv(lb))))
    assert rows[0]["backbone"] == "b" and float(rows[0]["probe:d1"]) == pytest.approx(0.8)
    data = json.loads(to_json(lb))
    assert data["rows"][0]["rank"] == 1 and data["provenance"][0]["cache"] == "x.zarr"


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.imgs, self.tables = [], 0

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.imgs.append(dict(attrs)["src"])
        self.tables += tag == "table"


def test_html_is_self_contained_with_real_pngs():
    lb = build(RECORDS + [rec("a", "fewshot", "d1", 0.5, shots=2)])
    figs = figures(lb, {"a": {"n_params": 1e6, "images_per_s": 50.0}, "b": {"n_params": 2e6, "images_per_s": 20.0}})
    assert {"zscore_heatmap", "aggregate", "accuracy_vs_cost", "fewshot_curves"} <= set(figs)
    page = to_html(lb, figs)
    parser = _Collect()
    parser.feed(page)
    assert parser.tables == 2 and len(parser.imgs) == 4
    for src in parser.imgs:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert "http" not in page.replace("http-equiv", "")
