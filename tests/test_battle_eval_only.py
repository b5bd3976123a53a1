"""A battle dataset with only an eval split: tasks that evaluate alone (zero-shot, text retrieval,
clustering) run on it; a task that needs a train split is refused in one line, naming the fix."""

from __future__ import annotations

import pytest

import backbench
from backbench.battle.config import ConfigError, parse_config
from backbench.battle.run import plan, run_battle
from backbench.store import Cache
from backbench.store.results import ResultsLog

RESNET = "timm:test_resnet@random"
CLUSTERING = {"seeds": 2, "niter": 10}


def _raw(**held) -> dict:
    return {"backbones": [RESNET], "workers": 0,
            "datasets": {"held": {"source": "digits", "splits": ["test"], "limit": 60, **held},
                         "digits": {"source": "digits", "splits": ["train", "test"], "limit": 60}},
            "tasks": {"probe": {"C": [1.0]}, "clustering": CLUSTERING}}


def test_an_eval_only_dataset_runs_the_tasks_that_need_no_train_split(tmp_path):
    config = parse_config(_raw(tasks=["clustering"]))
    assert config.datasets["held"].train is None and config.tasks_for(config.datasets["held"]) == ["clustering"]
    cells = plan(config)
    assert [(c.stage, c.split) for c in cells if c.dataset == "held"] == [("extract", "test"), ("clustering", "")]
    cache = Cache(str(tmp_path / "b.zarr"))
    summary = run_battle(config, cache)
    assert not summary.failed, [(r.cell.label, r.message) for r in summary.failed]
    held = [r for r in ResultsLog(cache).records() if r["dataset"] == "held"]
    assert [(r["task"], r["splits"].get("eval")) for r in held] == [("clustering", "test")]
    # the same clustering through the Python API, computed again, gives the same record
    direct = backbench.cluster(RESNET, "held", eval="test", cache=cache.path, force=True, **CLUSTERING).record
    assert direct["key"] == held[0]["key"] and direct["metrics"] == held[0]["metrics"]


@pytest.mark.parametrize("held, message", [
    ({"tasks": ["clustering", "probe"]}, 'datasets.held.tasks names probe, which need(s) a train split, which held '
                                         'lacks (splits: test); add one, or give it only tasks that evaluate alone '
                                         '(zeroshot, text-retrieval, clustering), e.g. tasks = ["clustering"]'),
    ({}, "datasets.held gets every task of the config, and probe need(s) a train split"),
    ({"train": "train"}, "datasets.held: train split 'train' is not among its splits (test)"),
])
def test_a_task_that_needs_a_train_split_is_refused_in_one_line(held, message):
    with pytest.raises(ConfigError) as info:
        parse_config(_raw(**held))
    assert message in str(info.value) and "\n" not in str(info.value)
    assert str(info.value).startswith("config: 1 problem(s): ")
