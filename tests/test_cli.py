"""The CLI as people use it: tables, --json, one-line errors with exit codes, export."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from backbench.store import Cache

RESNET = "timm:test_resnet@random"


@pytest.fixture
def filled(cache_path, run_cli):
    code, out, err = run_cli("extract", RESNET, "--data", "digits", "--dataset", "digits", "--split", "test",
                             "--cache", cache_path, "--limit", "40", "--workers", "0")
    assert code == 0, err
    assert "extracted 40 rows" in out
    return cache_path


def test_extract_rerun_says_nothing_to_do(filled, run_cli):
    code, out, _ = run_cli("extract", RESNET, "--data", "digits", "--dataset", "digits", "--split", "test",
                           "--cache", filled, "--limit", "40", "--workers", "0")
    assert code == 0 and "already complete (40 rows), nothing to do" in out


def test_ls_table_and_json(filled, run_cli):
    code, out, _ = run_cli("ls", "--cache", filled)
    assert code == 0 and RESNET in out and "digits" in out and "✓" in out
    code, out, _ = run_cli("ls", "--cache", filled, "--json")
    rows = json.loads(out)
    assert rows[0]["backbone"] == RESNET and rows[0]["n"] == 40 and rows[0]["dim"] == 96 and rows[0]["complete"]


def test_info_json_has_provenance(filled, run_cli):
    code, out, _ = run_cli("info", RESNET, "digits", "test", "--cache", filled, "--json")
    info = json.loads(out)
    assert code == 0 and info["weights_sha256"] and info["dataset_fingerprint"] and info["classes"][0] == "0"


def test_export_h5_round_trip(filled, run_cli, tmp_path):
    target = tmp_path / "f.h5"
    code, out, _ = run_cli("export", "--to", str(target), "--cache", filled)
    assert code == 0 and "wrote 1 group" in out
    group = Cache(filled).group(RESNET, "digits", "test")
    with h5py.File(target) as h5:
        g = h5[group.path]
        np.testing.assert_array_equal(g["features"][:], group.features())
        np.testing.assert_array_equal(g["labels"][:], group.labels())
        assert [s.decode() for s in g["ids"][:]] == group.ids().tolist()
        assert g.attrs["backbone"] == RESNET
        assert json.loads(g.attrs["preprocess"]) == group.attrs["preprocess"]
        assert json.loads(g["features"].attrs["dimension_names"]) == ["sample", "feature"]


def test_models_lists_local_weights(run_cli):
    code, out, _ = run_cli("models", "--json")
    names = {r["name"] for r in json.loads(out) if r["on_machine"]}
    assert code == 0 and "timm:tf_efficientnet_lite0@local" in names
    code, out, _ = run_cli("models", "--source", "timm", "test_vi", "--json")
    assert "timm:test_vit" in {r["name"] for r in json.loads(out)}


@pytest.mark.parametrize(
    "args, message",
    [
        (["extract", "timm:test_resnt@random", "--data", "digits", "--dataset", "d", "--split", "test"],
         "did you mean timm:test_resnet"),
        (["extract", "nosuch:x", "--data", "digits", "--dataset", "d", "--split", "test"], "unknown backbone source"),
        (["extract", RESNET, "--data", "imagefolder:/does/not/exist", "--dataset", "d", "--split", "test"],
         "does not exist"),
        (["extract", RESNET, "--data", "digits", "--dataset", "d/x", "--split", "test"], "dataset name"),
        (["info", RESNET, "digits", "nosplit"], "has no split 'nosplit'"),
        (["ls", "--cache", "/nonexistent/features.zarr"], "no feature cache"),
    ],
)
def test_errors_are_one_line_without_traceback(args, message, run_cli, filled):
    if "--cache" not in args:
        args = [*args, "--cache", filled]
    code, out, err = run_cli(*args)
    assert code != 0
    assert message in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_debug_shows_the_traceback(run_cli, filled):
    from backbench.errors import GroupNotFound

    with pytest.raises(GroupNotFound):
        run_cli("--debug", "info", RESNET, "digits", "nosplit", "--cache", filled)


def test_help_shows_examples(run_cli):
    for cmd in ("extract", "ls", "info", "export", "models"):
        code, out, _ = run_cli(cmd, "--help")
        assert code == 0 and "Example" in out
