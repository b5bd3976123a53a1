"""Battle configs: the default, TOML files, and the errors that name what to fix."""

from __future__ import annotations

import pytest

from backbench.battle.config import ConfigError, load_config, parse_config
from backbench.battle.run import plan


def test_default_config_covers_every_task():
    cfg = load_config()
    assert "timm:tf_efficientnet_lite0@local" in cfg.backbones and any("@random" in b for b in cfg.backbones)
    assert set(cfg.tasks) == {"probe", "fewshot", "knn", "retrieval", "ood", "shift", "clustering"}
    assert [d.name for d in cfg.main_datasets] == ["cifar10-mini"] and cfg.datasets["textures"].role == "ood"
    cells = plan(cfg)
    extract = [c for c in cells if c.stage == "extract"]
    assert len(extract) == len(cfg.backbones) * 4 and cells.index(extract[-1]) == len(extract) - 1
    assert len(cells) - len(extract) == len(cfg.backbones) * 7


def test_toml_file(tmp_path):
    path = tmp_path / "b.toml"
    path.write_text('''
backbones = ["timm:test_resnet@random"]
[datasets.pets]
splits = { train = "imagefolder:/x/train", val = "imagefolder:/x/val", test = "imagefolder:/x/test" }
val = "val"
[tasks.probe]
C = [0.1, 1.0]
''')
    cfg = load_config(path)
    assert cfg.datasets["pets"].splits["val"] == "imagefolder:/x/val" and cfg.datasets["pets"].val == "val"
    assert cfg.tasks == {"probe": {"C": [0.1, 1.0]}}


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"datasets": {"d": {"source": "digits", "splits": ["train", "test"]}}}, "backbones"),
        ({"backbones": ["timm:x@random"]}, "datasets"),
        ({"backbones": ["b:x"], "datasets": {"d": {"splits": ["train", "test"]}}}, "needs `source`"),
        ({"backbones": ["b:x"], "datasets": {"d": {"source": "digits", "splits": ["train"]}}}, "eval split 'test'"),
        ({"backbones": ["b:x"], "datasets": {"d": {"source": "digits", "splits": ["train", "test"]}},
          "tasks": {"probes": {}}}, "unknown task(s) probes"),
        ({"backbones": ["b:x"], "datasets": {"d": {"source": "digits", "splits": ["train", "test"]}},
          "tasks": {"ood": {"ood": ["nope:test"]}}}, "'nope:test'"),
        ({"backbones": ["b:x"], "datasets": {"d": {"source": "digits", "splits": ["train", "test"], "sorce": 1}}},
         "unknown key(s) sorce"),
    ],
)
def test_config_errors(raw, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_config(raw)


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "none.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("backbones = [")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_shards_split_extraction_cells():
    raw = {"backbones": ["timm:test_resnet@random"], "shards": 3,
           "datasets": {"digits": {"source": "digits", "splits": ["train", "test"]}}, "tasks": {"probe": {}}}
    cells = plan(parse_config(raw))
    assert [c.shard for c in cells if c.stage == "extract"] == [(0, 3), (1, 3), (2, 3)] * 2
    with pytest.raises(ConfigError, match="shards must be a positive integer"):
        parse_config({**raw, "shards": 0})
