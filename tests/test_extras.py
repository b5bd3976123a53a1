"""A command that needs an optional part that is not installed says which extra to install, in one line.

The part is made unimportable the way a missing package is (``sys.modules[name] = None`` makes
``import name`` raise ImportError); everything else is real.
"""

from __future__ import annotations

import pytest


@pytest.mark.parametrize("module, args, extra", [
    ("open_clip", ["extract", "open_clip:ViT-B-32@random", "--data", "digits", "--split", "test", "--limit", "8"],
     "clip"),
    ("transformers", ["extract", "hf:facebook/dinov2-small", "--data", "digits", "--split", "test"], "hf"),
    ("h5py", ["export", "--to", "x.h5"], "h5"),
    ("dask", ["battle", "--workers", "2"], "dask"),
])
def test_missing_extra_is_named_in_one_line(digits_cache, tmp_path, monkeypatch, run_cli, module, args, extra):
    monkeypatch.setitem(__import__("sys").modules, module, None)
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(*args, "--cache", digits_cache)
    assert code == 1, (out, err)
    lines = err.strip().splitlines()
    assert lines[-1] == f"error: {module} is not installed: run `pip install 'backbench[{extra}]'`", err
    assert "Traceback" not in err


def test_models_glob_matches_the_name_within_its_source(run_cli):
    """`models --source timm 'efficientnet_lite*'` and `--source open_clip 'ViT-B*'` (the documented forms)."""
    import json

    import timm

    code, out, _ = run_cli("models", "--source", "timm", "efficientnet_lite*", "--json")
    got = [r["name"] for r in json.loads(out)]
    assert code == 0 and {f"timm:{n}" for n in timm.list_models("efficientnet_lite*")} <= set(got)
    assert all(n.startswith("timm:efficientnet_lite") for n in got)
    code, out, _ = run_cli("models", "--source", "open_clip", "ViT-B*", "--json")
    names = [r["name"] for r in json.loads(out)]
    assert code == 0 and "open_clip:ViT-B-32" in names and all(n.startswith("open_clip:ViT-B") for n in names)
