"""What the commands a person reruns import: light commands and reused records need neither
torch nor scikit-learn (each costs seconds of start-up; bench/latency.py times them)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

HEAVY = ("torch", "sklearn", "scipy")
PROBE = ["probe", "-b", "fake:pixels", "-d", "digits", "--train", "train", "--eval", "test"]
KNN = ["knn", "-b", "fake:pixels", "-d", "digits", "--train", "train", "--eval", "test", "-k", "5"]
CHECK = """
import json, sys
from backbench.cli import main
try:
    main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code or 0
else:
    code = 0
print(json.dumps({"code": code, "heavy": [m for m in %r if m in sys.modules]}), file=sys.stderr)
""" % (HEAVY,)


def heavy_imports(*args: str) -> list[str]:
    """The heavy packages ``backbench ARGS`` imported, in a fresh interpreter (it must exit 0)."""
    proc = subprocess.run([sys.executable, "-c", CHECK, *args], capture_output=True, text=True, timeout=300)
    report = json.loads(proc.stderr.strip().splitlines()[-1])
    assert report["code"] == 0, proc.stderr
    return report["heavy"]


@pytest.fixture
def probed_cache(digits_cache, run_cli) -> str:
    """The digits cache with a probe and a kNN record already logged."""
    for args in (PROBE, KNN):
        code, _, err = run_cli(*args, "--cache", digits_cache)
        assert code == 0, err
    return digits_cache


def test_light_commands_and_reused_records_import_neither_torch_nor_sklearn(probed_cache):
    cache = ["--cache", probed_cache]
    for args in (["--help"], ["ls", *cache], ["results", *cache], ["info", "fake:pixels", "digits", "train", *cache],
                 [*PROBE, *cache], [*KNN, *cache]):
        assert heavy_imports(*args) == [], args
    assert "torch" not in heavy_imports("report", *cache)  # the report needs scipy.stats, not torch


def test_auto_device_is_resolved_when_a_task_first_reads_it():
    from backbench.tasks.base import RunOptions

    code = ("import sys; from backbench.tasks.base import RunOptions; o = RunOptions('auto'); "
            "print('torch' in sys.modules, o.device in ('cpu', 'cuda'), 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300).stdout.split()
    assert out == ["False", "True", "True"]
    assert RunOptions().device == "cpu" and RunOptions("cpu", force=True).force


def test_small_fits_use_one_thread_and_give_the_threads_back(monkeypatch):
    import torch

    from backbench.probe import linear

    seen = []
    real = linear._path

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    before = torch.get_num_threads()
    X = np.random.default_rng(0).standard_normal((60, 4)).astype(np.float32)
    y = np.arange(60) % 3
    monkeypatch.setattr(linear, "_path", spy)
    linear.select_and_fit(X, y, [1.0], seed=0)
    assert seen == [1] and torch.get_num_threads() == before
