"""A small real battle: tiny random-init timm models on digits, every task, end to end."""

from __future__ import annotations

import json

import pytest

from backbench.battle.config import parse_config
from backbench.battle.run import run_battle
from backbench.report.leaderboard import build
from backbench.store.results import ResultsLog
from backbench.store import Cache

RAW = {
    "backbones": ["timm:test_resnet@random", "timm:test_vit@random"],
    "workers": 0,
    "datasets": {
        "digits": {"source": "digits", "splits": ["train", "test", "shifted"], "limit": 150},
        "textures": {"source": "textures", "splits": ["test"], "role": "ood", "limit": 60},
    },
    "tasks": {
        "probe": {"C": [0.01, 0.1, 1.0]},
        "fewshot": {"shots": [1, 2], "seeds": 2, "C": [0.1, 1.0]},
        "knn": {"k": [5, 10]},
        "retrieval": {"ks": [1, 5]},
        "ood": {"ood": ["textures:test"], "open_set": ["9"], "scores": ["knn", "msp", "mahalanobis"]},
        "shift": {"shifted": ["digits:shifted"]},
    },
}


def _keys(cache) -> dict:
    return {r["key"]: r["metrics"] for r in ResultsLog(cache).records()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    cache = Cache(str(tmp_path_factory.mktemp("battle") / "b.zarr"))
    summary = run_battle(parse_config(RAW), cache)
    return cache, summary


def test_battle_runs_every_cell(finished):
    cache, summary = finished
    assert not summary.failed, [(r.cell.label, r.message) for r in summary.failed]
    tasks = {r["task"] for r in ResultsLog(cache).records()}
    assert tasks == {"probe", "fewshot", "knn", "retrieval", "ood", "open-set", "shift"}
    lb = build(ResultsLog(cache).records())
    assert sorted(lb.backbones) == sorted(RAW["backbones"]) and sorted(lb.rank.tolist()) == [1, 2]


def test_rerun_reuses_everything(finished):
    cache, _ = finished
    again = run_battle(parse_config(RAW), cache)
    assert {r.status for r in again.results} == {"reused"}


def test_interrupted_battle_finishes_on_rerun(tmp_path, finished):
    cache = Cache(str(tmp_path / "i.zarr"))
    seen = []

    def stop_after_some(result):
        seen.append(result)
        if len(seen) == 11:  # the 8 extractions and a few tasks are done
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_battle(parse_config(RAW), cache, on_done=stop_after_some)
    summary = run_battle(parse_config(RAW), cache)
    statuses = [r.status for r in summary.results]
    assert statuses[:11] == ["reused"] * 11 and "done" in statuses[11:] and not summary.failed
    assert _keys(cache).keys() == _keys(finished[0]).keys()


def test_failing_cell_is_reported_and_the_rest_runs(tmp_path):
    raw = json.loads(json.dumps(RAW))
    raw["backbones"] = ["timm:test_resnet@random", "timm:test_resnet@/no/such/weights.pth"]
    raw["tasks"] = {"probe": {"C": [0.1]}}
    raw["datasets"]["digits"]["limit"] = 60
    summary = run_battle(parse_config(raw), Cache(str(tmp_path / "f.zarr")))
    failed = {(r.cell.stage, r.status) for r in summary.failed}
    assert failed == {("extract", "failed"), ("probe", "skipped")}
    assert any("does not exist" in r.message for r in summary.failed)
    ok = [r for r in summary.results if r.cell.backbone == "timm:test_resnet@random"]
    assert all(r.status == "done" for r in ok)


def test_battle_cli_prints_leaderboard_and_report(finished, run_cli, tmp_path):
    cache, _ = finished
    cfg = tmp_path / "b.toml"
    lines = ['backbones = ["timm:test_resnet@random", "timm:test_vit@random"]', "workers = 0"]
    lines += ['[datasets.digits]', 'source = "digits"', 'splits = ["train", "test", "shifted"]', "limit = 150"]
    lines += ['[datasets.textures]', 'source = "textures"', 'splits = ["test"]', 'role = "ood"', "limit = 60"]
    lines += ["[tasks.probe]", "C = [0.01, 0.1, 1.0]"]
    cfg.write_text("\n".join(lines))
    code, out, err = run_cli("battle", str(cfg), "--cache", cache.path)
    assert code == 0, err
    assert "leaderboard" in out and "HTML report:" in out and "timm:test_vit@random" in out
    html = out.split("HTML report:")[1].split()[0]
    assert open(html).read().startswith("<!DOCTYPE html>")
    code, out, _ = run_cli("report", "--cache", cache.path, "--format", "json")
    data = json.loads(out)
    assert code == 0 and {r["backbone"] for r in data["rows"]} == set(RAW["backbones"])
    code, out, _ = run_cli("report", "--cache", cache.path, "--format", "csv", "--png", str(tmp_path / "png"))
    assert out.startswith("rank,backbone") and (tmp_path / "png" / "zscore_heatmap.png").exists()
