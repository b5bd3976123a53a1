"""The package as a user installs it: a wheel, installed beside an environment's own torch.

The wheel is built with pip from this checkout and installed with ``--no-index`` into a fresh
virtual environment that sees this environment's packages (torch among them) through a ``.pth``
file, as a user's environment with its own CUDA torch would: pip must find every dependency
satisfied and replace nothing. Then ``backbench --version`` and the README's quickstart run.
"""

from __future__ import annotations

import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_installs_beside_the_environments_torch_and_runs_the_quickstart(tmp_path):
    import torch

    wheels = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(wheels)], check=True, capture_output=True, timeout=300)
    (wheel,) = wheels.glob("backbench-*.whl")
    env = tmp_path / "env"
    subprocess.run([sys.executable, "-m", "venv", str(env)], check=True, timeout=120)
    site = next((env / "lib").glob("python*/site-packages"))
    (site / "user-environment.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    # the venv's own old setuptools would shadow the environment's (torch needs a newer one)
    subprocess.run([str(env / "bin/python"), "-m", "pip", "uninstall", "-y", "-q", "setuptools"], check=True,
                   capture_output=True, timeout=120)
    done = subprocess.run([str(env / "bin/python"), "-m", "pip", "install", "--no-index", "-q", str(wheel)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert not list(site.glob("torch")), "pip installed a torch of its own"
    run = subprocess.run([str(env / "bin/backbench"), "--version"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "backbench 0.1.0", run.stderr
    check = subprocess.run([str(env / "bin/python"), "-c", "import torch, backbench; print(torch.__version__, "
                            "backbench.__file__)"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    version, where = check.stdout.split()
    assert version == torch.__version__ and str(site) in where  # the user's torch, the installed backbench
    # the real photos ship in the wheel (package data): the quickstart reads them from it
    for args in (["extract", "timm:test_resnet@random", "--data", "cifar10-mini", "--split", "train", "--limit", "60",
                  "--workers", "0"],
                 ["extract", "timm:test_resnet@random", "--data", "cifar10-mini", "--split", "test", "--limit", "40",
                  "--workers", "0"],
                 ["probe", "-b", "timm:test_resnet@random", "-d", "cifar10-mini", "--train", "train", "--eval", "test",
                  "--C", "1"]):
        step = subprocess.run([str(env / "bin/backbench"), *args], cwd=tmp_path, capture_output=True, text=True,
                              timeout=300)
        assert step.returncode == 0, (args, step.stderr)
    assert "probe" in step.stdout and "top1" in step.stdout
