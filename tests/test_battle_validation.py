"""Issue 18 (14, 20): a battle config is validated whole when loaded; one cache precedence everywhere."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from backbench.battle.config import ConfigError, load_config, parse_config, resolve_cache
from backbench.store.results import ResultsLog
from backbench.store import Cache

GOOD = {"backbones": ["timm:test_resnet@random"], "workers": 0,
        "datasets": {"digits": {"source": "digits", "splits": ["train", "test"], "limit": 40}},
        "tasks": {"probe": {"C": [1.0]}}}


def _with(**changes) -> dict:
    raw = {**GOOD, "datasets": {"digits": dict(GOOD["datasets"]["digits"])}, "tasks": dict(GOOD["tasks"])}
    for key, value in changes.items():
        if key.startswith("digits_"):
            raw["datasets"]["digits"][key.removeprefix("digits_")] = value
        elif key.startswith("task_"):
            raw["tasks"][key.removeprefix("task_")] = value
        else:
            raw[key] = value
    return raw


def _problems(raw: dict) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(raw, "b.toml")
    return str(info.value)


def test_the_good_config_loads():
    cfg = parse_config(GOOD)
    assert cfg.tasks == {"probe": {"C": [1.0]}} and cfg.datasets["digits"].limit == 40


@pytest.mark.parametrize("changes, message", [
    # the examples, one by one
    ({"task_probe": {"Cs": [0.1]}}, "tasks.probe: unknown key(s) Cs (known: C)"),
    ({"task_probe": {"foo": 1}}, "tasks.probe: unknown key(s) foo"),
    ({"task_knn": {"ks": [5]}}, "tasks.knn: unknown key(s) ks (known: k, temperature)"),
    ({"digits_limit": -5}, "datasets.digits.limit must be a positive integer (rows), not -5"),
    ({"task_knn": {"k": "five"}}, "tasks.knn.k must be a non-empty list of positive integers, e.g. [10, 20], "
                                  "not 'five'"),
    ({"tasks": "probe"}, "tasks must be a table of [tasks.NAME] sections"),
    ({"task_fewshot": {"shots": []}}, "tasks.fewshot.shots must be a non-empty list of positive integers"),
    ({"workers": -3}, "workers must be an integer >= 0"),
    ({"device": "banana"}, "device must be auto, cpu, cuda, cuda:N or mps, not 'banana'"),
    ({"backbones": ["timm:resnet1888@random"]}, "backbones[0]: backbone 'timm:resnet1888@random': unknown timm model"),
    ({"backbones": ["nosuch:resnet18"]}, "unknown backbone source 'nosuch'"),
    ({"digits_source": "digitz"}, "datasets.digits.source: unknown data source 'digitz'"),
    ({"digits_splits": {"train": "imagefolder:", "test": "digits"}}, "datasets.digits.splits.train: data source "
                                                                     "imagefolder: needs a path"),
    # the same class: other types and ranges
    ({"batch_size": 0}, "batch_size must be a positive integer, not 0"),
    ({"cache": 3}, "cache must be a path or URL string"),
    ({"digits_limit": 2.5}, "datasets.digits.limit must be a positive integer"),
    ({"digits_val": "val"}, "val split 'val' is not among its splits"),
    ({"task_fewshot": {"seeds": 0}}, "tasks.fewshot.seeds must be a positive integer, not 0"),
    ({"task_probe": {"C": 1.0}}, "tasks.probe.C must be a non-empty list of positive numbers"),
    ({"task_probe": {"C": [0.0]}}, "tasks.probe.C must be a non-empty list of positive numbers"),
    ({"task_knn": {"k": [True]}}, "tasks.knn.k must be a non-empty list of positive integers"),
    ({"task_knn": {"temperature": -1}}, "tasks.knn.temperature must be a positive number"),
    ({"task_ood": {"open_set": ["9"], "scores": ["msp", "nope"]}}, "tasks.ood.scores must be a non-empty list of OOD"),
    ({"task_ood": {"open_set": [9]}}, "tasks.ood.open_set must be a non-empty list of class names"),
    ({"task_ood": {}}, "tasks.ood runs nothing without ood or open_set"),
    ({"task_shift": {}}, "tasks.shift runs nothing without shifted"),
    ({"task_probe": []}, "tasks.probe must be a table"),
    ({"datasets": {"digits": "digits"}}, "datasets.digits must be a table"),
])
def test_each_problem_names_its_key_and_what_is_accepted(changes, message):
    assert message in _problems(_with(**changes))


def test_every_problem_is_reported_at_once():
    raw = _with(workers=-3, device="banana", digits_limit=-5, task_knn={"k": "five", "ks": [1]},
                task_fewshot={"shots": []}, backbones=["timm:test_resnet@random", "foo:bar"])
    text = _problems(raw)
    assert text.startswith("b.toml: 7 problem(s): ") and "\n" not in text
    for key in ("workers", "device", "datasets.digits.limit", "tasks.knn.k", "tasks.knn: unknown key(s) ks",
                "tasks.fewshot.shots", "backbones[1]: backbone 'foo:bar'"):
        assert key in text


def test_no_tasks_table_runs_the_tasks_that_need_no_inputs():
    raw = {k: v for k, v in GOOD.items() if k != "tasks"}
    assert list(parse_config(raw).tasks) == ["probe", "fewshot", "knn", "retrieval"]


def test_cli_prints_one_line_and_exits_2(tmp_path, run_cli):
    cfg = tmp_path / "bad.toml"
    cfg.write_text('backbones = ["timm:test_resnet@random"]\nworkers = -3\n[datasets.d]\nsource = "digits"\n'
                   'splits = ["train", "test"]\nlimit = -5\n[tasks.knn]\nk = "five"\n')
    code, out, err = run_cli("battle", str(cfg), "--cache", str(tmp_path / "c.zarr"))
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("error: ") and "3 problem(s)" in err
    assert "unexpected" not in err and not (tmp_path / "c.zarr").exists()
    code, _, err = run_cli("battle", "--device", "banana", "--cache", str(tmp_path / "c.zarr"))
    assert code == 2 and "--device must be auto, cpu, cuda, cuda:N or mps" in err


# ----------------------------------------------------------------------------- item 20


def test_cache_precedence(monkeypatch):
    cfg = parse_config({**GOOD, "cache": "from-config.zarr"}, "b.toml")
    bare = parse_config(GOOD, "b.toml")
    monkeypatch.delenv("BACKBENCH_CACHE", raising=False)
    assert resolve_cache(None, bare) == ("battle.zarr", "the default")
    assert resolve_cache(None, cfg) == ("from-config.zarr", "cache in b.toml")
    monkeypatch.setenv("BACKBENCH_CACHE", "env.zarr")
    assert resolve_cache(None, cfg) == ("env.zarr", "$BACKBENCH_CACHE")
    assert resolve_cache("cli.zarr", cfg) == ("cli.zarr", "--cache")


def test_env_cache_beats_the_config_and_report_finds_the_results(tmp_path, monkeypatch, run_cli):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("BACKBENCH_CACHE", "x.zarr")
    cfg = Path("b.toml")
    cfg.write_text('cache = "other.zarr"\nbackbones = ["timm:test_resnet@random"]\nworkers = 0\n'
                   '[datasets.digits]\nsource = "digits"\nsplits = ["train", "test"]\nlimit = 40\n'
                   '[tasks.probe]\nC = [1.0]\n')
    code, out, err = run_cli("battle", str(cfg))
    assert code == 0, out + err
    assert "cache: x.zarr (from $BACKBENCH_CACHE)" in err
    assert os.path.isdir("x.zarr") and not os.path.exists("other.zarr")
    assert [r["task"] for r in ResultsLog(Cache("x.zarr", mode="r")).records()] == ["probe"]
    code, out, err = run_cli("report", "--format", "json")
    assert code == 0 and '"backbone": "timm:test_resnet@random"' in out


def test_a_missing_weights_file_is_left_to_its_cells_and_reported_in_one_line(tmp_path):
    from backbench.battle.run import run_battle

    raw = _with(backbones=["timm:test_resnet@/no/such/weights.pth"])
    summary = run_battle(parse_config(raw), Cache(str(tmp_path / "c.zarr")))
    (extract, *_), probe = summary.failed, summary.failed[-1]
    assert extract.status == "failed" and "does not exist" in extract.message and "\n" not in extract.message
    assert not extract.traceback and probe.status == "skipped"


def test_an_unexpected_error_is_one_line_in_the_table_with_its_traceback_kept_apart():
    from backbench.battle.run import Cell, CellResult

    result = CellResult(Cell("probe", "b:x", "d"), "done")
    try:
        int("five\nsix")
    except ValueError as exc:
        result.fail(exc)
    assert result.status == "failed" and "\n" not in result.message
    assert result.message.startswith("unexpected ValueError: invalid literal") and "Traceback" not in result.message
    assert "int(\"five\\nsix\")" in result.traceback and result.to_dict()["traceback"] == result.traceback


def test_the_documented_battle_config_is_valid():
    """Every battle config the README or the docs site shows (docs/protocols.md has the full one)."""
    import re
    import tomllib

    root = Path(__file__).parents[1]
    text = "".join(p.read_text() for p in [root / "README.md", *sorted((root / "docs").glob("*.md"))])
    blocks = [b for b in re.findall(r"```toml\n(.*?)```", text, re.S) if "[tasks." in b]
    assert blocks, "the docs show a battle config"
    for block in blocks:
        cfg = parse_config(tomllib.loads(block), "README")
        assert set(cfg.tasks) == {"probe", "fewshot", "knn", "retrieval", "ood", "shift", "segmentation", "detection",
                                  "text-retrieval"}
        assert cfg.tasks_for(cfg.datasets["voc"]) == ["segmentation"]
        assert cfg.datasets["flickr"].train is None and cfg.tasks_for(cfg.datasets["flickr"]) == ["text-retrieval"]
        assert "segmentation" not in cfg.tasks_for(cfg.datasets["pets"])
