"""The task layer: a task added by one file runs through the CLI, the battle and the Python API;
requests are data (explicit features and memory limit), keyed as before the task layer."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.neighbors import NearestCentroid

import backbench
from backbench.store import Cache
from backbench.store.results import ResultsLog
from backbench.tasks import FeatureSpec, RunOptions, TaskRequest, get_task, registered, run_task

B = "fake:pixels"


def _reference(cache_path: str) -> float:
    g = {s: Cache(cache_path).group(B, "digits", s) for s in ("train", "test")}
    model = NearestCentroid().fit(g["train"].features().astype(np.float32), g["train"].labels())
    return float((model.predict(g["test"].features().astype(np.float32)) == g["test"].labels()).mean())


def test_a_task_in_one_file_runs_through_cli_battle_and_api(digits_cache, tmp_path, run_cli):
    import toy_task  # noqa: F401  (registers "centroid"; nothing else is edited)

    want = _reference(digits_cache)
    # the CLI: a generated command with the task's roles and parameters
    code, out, err = run_cli("centroid", "-b", B, "-d", "digits", "--train", "train", "--eval", "test",
                             "--shrink", "1", "--cache", digits_cache, "--json")
    assert code == 0, err
    (rec,) = json.loads(out)
    assert rec["task"] == "centroid" and rec["metrics"]["top1"] == pytest.approx(want, abs=1e-12)
    code, _, err = run_cli("centroid", "-b", B, "-d", "digits", "--train", "train", "--eval", "test",
                           "--shrink", "-1", "--cache", digits_cache)
    assert code == 1 and "centroid.shrink must be a positive number" in err
    # the Python API: the same request, so the record is reused
    result = backbench.run("centroid", B, "digits", splits={"train": "train", "eval": "test"},
                           params={"shrink": 1.0}, cache=digits_cache)
    assert result.reused == [True] and result.metrics["top1"] == rec["metrics"]["top1"]
    assert result.to_dict()["records"][0]["key"] == rec["key"]
    # the battle: [tasks.centroid] checked against its schema, run, and ranked
    from backbench.battle.config import ConfigError, parse_config
    from backbench.battle.run import run_battle

    raw = {"backbones": ["timm:test_resnet@random"], "workers": 0,
           "datasets": {"digits": {"source": "digits", "splits": ["train", "test"], "limit": 40}},
           "tasks": {"centroid": {"shrink": 1.0}}}
    with pytest.raises(ConfigError, match="tasks.centroid: unknown key"):
        parse_config({**raw, "tasks": {"centroid": {"shrnk": 1.0}}})
    cache = Cache(str(tmp_path / "b.zarr"))
    summary = run_battle(parse_config(raw), cache)
    assert not summary.failed, [r.message for r in summary.failed]
    (rec,) = [r for r in ResultsLog(cache).records() if r["task"] == "centroid"]
    board = json.loads(backbench.report(cache, format="json"))
    assert "centroid:digits" in board["columns"]
    assert rec["features"] == "pooled" and board["features"] == {"timm:test_resnet@random": "pooled"}


def test_registry_lists_the_built_in_tasks_with_schemas():
    tasks = registered()
    assert {"probe", "fewshot", "knn", "knn-fewshot", "retrieval", "ood", "shift", "probe-multilabel"} <= set(tasks)
    assert get_task("knn").check_params({"k": "five"})[1] == [
        "tasks.knn.k must be a non-empty list of positive integers, e.g. [10, 20], not 'five'"]
    with pytest.raises(Exception, match="unknown task 'nope'"):
        get_task("nope")


def test_requests_are_data_and_keep_the_record_keys(digits_cache):
    """The same probe through the API, a request and the old function: one record (the same key)."""
    from backbench.probe.tasks import run_probe

    rec, reused = run_probe(Cache(digits_cache), B, "digits", "train", "test", Cs=[0.1, 1.0])
    request = get_task("probe").request(B, "digits", {"train": "train", "eval": "test", "val": None},
                                        params={"C": [0.1, 1.0]})
    assert isinstance(request, TaskRequest) and request.features == FeatureSpec("pooled")
    ((again, reused_again),) = run_task(Cache(digits_cache), request, RunOptions(memory_limit="1KB"))
    assert not reused and reused_again and again["key"] == rec["key"]
    api = backbench.probe(B, "digits", train="train", eval="test", C=[0.1, 1.0], cache=digits_cache)
    assert api.reused == [True] and api.record["key"] == rec["key"]
    # the key is the hash of the same fields records had before the task layer
    from backbench.store.results import request_key

    legacy = {"task": "probe", "backbone": B, "dataset": "digits", "splits": {"train": "train", "eval": "test",
              "val": None}, "params": {"Cs": [0.1, 1.0], "selection": "holdout-10%"}, "seed": 0,
              "groups": {s: Cache(digits_cache).group(B, "digits", s).attrs["cache_key"] for s in ("train", "test")}}
    assert rec["key"] == request_key(legacy)


def test_one_vocabulary_old_spellings_work_with_a_note(digits_cache, run_cli):
    """ood and shift name their splits as probe and knn do (-d, --train, --eval); the old
    spellings (--id-dataset/--id-train/--id-test, --train DATASET:SPLIT) still run, with a note."""
    new = ["ood", "-b", B, "-d", "digits", "--train", "train", "--eval", "test", "--open-set", "9",
           "--scores", "msp", "--cache", digits_cache, "--json"]
    code, out, err = run_cli(*new)
    assert code == 0 and err == "", err
    old = ["ood", "-b", B, "--id-dataset", "digits", "--id-train", "train", "--id-test", "test", "--open-set", "9",
           "--scores", "msp", "--cache", digits_cache, "--json"]
    code, out_old, err = run_cli(*old)
    assert code == 0 and "--id-train is now --train" in err
    assert json.loads(out_old)[0]["key"] == json.loads(out)[0]["key"]
    code, out, err = run_cli("shift", "-b", B, "-d", "digits", "--train", "train", "--eval", "test",
                             "--shifted", "digits:val", "--cache", digits_cache, "--json")
    assert code == 0 and err == "", err
    code, out_old, err = run_cli("shift", "-b", B, "--train", "digits:train", "--eval", "digits:test",
                                 "--shifted", "digits:val", "--cache", digits_cache, "--json")
    assert code == 0 and "is now -d DATASET --train SPLIT" in err
    assert json.loads(out_old)["key"] == json.loads(out)["key"]


def test_dataset_defaults_from_a_builtin_data_source(tmp_path, run_cli):
    cache = str(tmp_path / "c.zarr")
    code, _, err = run_cli("extract", "timm:test_resnet@random", "--data", "digits", "--split", "test",
                           "--limit", "16", "--workers", "0", "--cache", cache)
    assert code == 0, err
    assert Cache(cache).group("timm:test_resnet@random", "digits", "test").n == 16
    code, _, err = run_cli("extract", "timm:test_resnet@random", "--data", f"imagefolder:{tmp_path}", "--split",
                           "test", "--cache", cache)
    assert code == 2 and "missing option --dataset" in err and "digits, textures" in err
