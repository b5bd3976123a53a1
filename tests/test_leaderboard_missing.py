"""Issue 18 (5): a missing (backbone, task) cell is shown as missing, never z = 0, and is left
out of that backbone's mean, which says how many tasks it covers."""

from __future__ import annotations

import csv
import io
import json
import statistics

import numpy as np
import pytest

from backbench.report.leaderboard import build
from backbench.report.render import to_csv, to_html, to_json, to_markdown
from tests.conftest import digits_pixels, put_group


def rec(backbone: str, task: str, value: float, metric: str = "top1") -> dict:
    return {"task": task, "backbone": backbone, "dataset": "d", "metrics": {metric: value}, "params": {},
            "seed": 0, "created": "2026-01-01", "cache": "x.zarr", "versions": {}}


RECORDS = [rec("a", "probe", 0.9), rec("b", "probe", 0.8), rec("c", "probe", 0.6),
           rec("a", "knn", 0.5), rec("b", "knn", 0.7), rec("c", "knn", 0.9),
           rec("a", "ood", 0.8, "auroc"), rec("b", "ood", 0.6, "auroc"),  # c lacks ood
           rec("a", "shift", 0.4, "shifted_top1")]  # only a has shift


def _z(values: list[float]) -> list[float]:
    """The z-score by the textbook formula, population std (an independent reference)."""
    mu, sd = statistics.fmean(values), statistics.pstdev(values)
    return [(v - mu) / sd for v in values]


def test_missing_cells_are_left_out_of_the_mean_never_zero():
    lb = build(RECORDS)
    assert lb.backbones == ["a", "b", "c"] and lb.tasks == ["probe", "knn", "ood", "shift"]
    zp, zk, zo = _z([0.9, 0.8, 0.6]), _z([0.5, 0.7, 0.9]), _z([0.8, 0.6])  # zo = (+1, -1)
    expect = {"a": (zp[0] + zk[0] + zo[0]) / 3, "b": (zp[1] + zk[1] + zo[1]) / 3, "c": (zp[2] + zk[2]) / 2}
    np.testing.assert_allclose(lb.aggregate, [expect["a"], expect["b"], expect["c"]], rtol=1e-12)
    assert np.isnan(lb.task_z[2, 2])  # c's ood: missing, not 0
    assert np.isnan(lb.task_z[:, 3]).all()  # shift: one backbone only, nothing to compare, not 0
    rows = {r["backbone"]: r for r in lb.rows()}
    assert {b: r["tasks"] for b, r in rows.items()} == {"a": "3/4", "b": "3/4", "c": "2/4"}
    assert rows["c"]["z:ood"] is None and rows["c"]["ood:d"] is None and rows["a"]["shift:d"] == 0.4
    assert rows["b"]["missing"] == "shift:d" and rows["c"]["missing"] == "ood:d, shift:d" and rows["a"]["missing"] == ""
    order = sorted(expect, key=lambda b: -expect[b])
    assert [r["backbone"] for r in lb.rows()] == order


def test_every_format_says_which_cells_are_missing():
    lb = build(RECORDS)
    md = to_markdown(lb)
    assert "| – |" in md and "Note: missing cells (no record; left out of that backbone's mean, shown as –): " \
                             "b shift:d; c ood:d; c shift:d" in md
    assert "only one backbone has shift:d: no z-score" in md
    page = to_html(lb, {})
    assert "Note: missing cells" in page and "c ood:d" in page
    rows = {r["backbone"]: r for r in csv.DictReader(io.StringIO(to_csv(lb)))}
    assert rows["c"]["ood:d"] == "" and rows["c"]["missing"] == "ood:d, shift:d" and rows["c"]["tasks"] == "2/4"
    data = json.loads(to_json(lb))
    assert {"backbone": "c", "column": "ood:d"} in data["missing"] and len(data["missing"]) == 3
    assert any("missing cells" in n for n in data["notes"])


def test_complete_leaderboards_have_no_notes():
    lb = build([r for r in RECORDS if r["task"] in ("probe", "knn")])
    assert lb.notes() == [] and all(r["tasks"] == "2/2" and r["missing"] == "" for r in lb.rows())
    assert "Note:" not in to_markdown(lb)


@pytest.fixture
def two_backbones(cache_path) -> str:
    """Real groups of two backbones: digits pixels, and the same with noise, plus a shifted split."""
    X, y, parts = digits_pixels()
    noisy = X + np.random.default_rng(5).normal(0, 4.0, X.shape).astype(np.float32)
    for name, feats in (("fake:a", X), ("fake:b", noisy)):
        for split, rows in (("train", parts["train"]), ("test", parts["test"]), ("shifted", parts["val"])):
            put_group(cache_path, name, "digits", split, feats[rows], y[rows])
    return cache_path


def test_battle_where_shift_ran_for_one_backbone(two_backbones, run_cli):
    """The issue's case on a real cache: probe for both backbones, shift only for one."""
    from backbench.probe.ood_tasks import run_shift
    from backbench.probe.tasks import run_probe
    from backbench.store import Cache

    cache = Cache(two_backbones)
    top1 = {b: run_probe(cache, b, "digits", "train", "test", Cs=[1.0])[0]["metrics"]["top1"]
            for b in ("fake:a", "fake:b")}
    run_shift(cache, "fake:a", ("digits", "train"), ("digits", "test"), [("digits", "shifted")])
    assert top1["fake:a"] > top1["fake:b"]
    code, out, err = run_cli("report", "--cache", two_backbones, "--format", "json")
    assert code == 0, err
    rows = {r["backbone"]: r for r in json.loads(out)["rows"]}
    # two backbones: probe z = +1 / -1; shift has one backbone, so no z-score; each mean covers 1 of 2 tasks
    assert rows["fake:a"]["z_mean"] == pytest.approx(1.0) and rows["fake:b"]["z_mean"] == pytest.approx(-1.0)
    assert rows["fake:a"]["z:shift"] is None and rows["fake:b"]["shift:digits"] is None
    assert rows["fake:a"]["tasks"] == rows["fake:b"]["tasks"] == "1/2" and rows["fake:b"]["missing"] == "shift:digits"
    code, out, err = run_cli("report", "--cache", two_backbones)
    assert code == 0 and "note: missing cells" in out and "fake:b shift:digits" in out and "–" in out
