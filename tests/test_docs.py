"""The documentation site builds with ``mkdocs build --strict`` (warnings are errors: a broken
link, a missing page, an API docstring mkdocstrings cannot read, the generated CLI reference)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("mkdocstrings") is None,
                    reason="mkdocs and mkdocstrings are not installed (the dev extra installs them)")
def test_the_docs_site_builds_strict(tmp_path):
    site = tmp_path / "site"
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "-f",
                           str(ROOT / "mkdocs.yml"), "-d", str(site)], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert done.returncode == 0, done.stdout + done.stderr
    cli = (site / "cli" / "index.html").read_text()
    for command in ("extract", "probe", "knn", "ood", "battle", "report"):  # the generated reference
        assert f'id="backbench-{command}"' in cli
    assert "select_and_fit" in (site / "protocols" / "index.html").read_text()
    assert 'id="backbench.api.probe"' in (site / "api" / "index.html").read_text()
