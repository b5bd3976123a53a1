"""Everything read from a cache is printed as text: no rich markup, no terminal control
characters, in tables, `info`, `ls`, `results`, `report` and errors (issue 18: 9)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import put_group

SOURCE = "\x1b]0;title\x07 [link=file:///etc/passwd]x[/link] \x9b2J"
BACKBONE = "fake:[bold]b[/oops]\x1b[2J"
CLASSES = ["[/oops]", "[red]r[/red]", ":cat:", "ok"]


def _controls(text: str) -> list[str]:
    """Control characters a terminal would act on (all but newline and tab)."""
    return [c for c in text if (ord(c) < 0x20 and c not in "\n\t") or 0x7F <= ord(c) < 0xA0]


@pytest.fixture
def hostile(cache_path) -> str:
    rng = np.random.default_rng(0)
    y = np.arange(80) % 4
    X = (rng.normal(size=(80, 6)) + y[:, None]).astype(np.float32)
    for split in ("train", "test"):
        put_group(cache_path, BACKBONE, "d", split, X, y, CLASSES, source=SOURCE)
    return cache_path


def _plain(out: str) -> str:
    assert not _controls(out), _controls(out)
    return out


def test_ls_prints_names_as_text(hostile, run_cli):
    code, out, err = run_cli("ls", "--cache", hostile)
    assert code == 0, err
    assert "[bold]b[/oops]\\x1b[2J" in _plain(out)


def test_info_prints_attributes_as_text(hostile, run_cli):
    code, out, err = run_cli("info", BACKBONE, "d", "train", "--cache", hostile)
    assert code == 0, err
    _plain(out)
    assert "source: \\x1b]0;title\\x07 [link=file:///etc/passwd]x[/link] \\x9b2J" in out
    assert json.loads(out.split("classes: ", 1)[1].splitlines()[0]) == CLASSES  # ":cat:" not an emoji


def test_info_json_keeps_the_exact_values_in_ascii(hostile, run_cli):
    code, out, _ = run_cli("info", BACKBONE, "d", "train", "--cache", hostile, "--json")
    info = json.loads(_plain(out))
    assert code == 0 and info["source"] == SOURCE and info["classes"] == CLASSES and info["backbone"] == BACKBONE


def test_tables_of_results_and_the_leaderboard_print_names_as_text(hostile, run_cli):
    code, out, err = run_cli("probe", "-b", BACKBONE, "-d", "d", "--train", "train", "--eval", "test",
                             "--C", "0.1", "1", "--cache", hostile)
    assert code == 0, err
    assert "[bold]b[/oops]" in _plain(out)
    for args in (["results"], ["report"], ["report", "--format", "csv"]):
        code, out, err = run_cli(*args, "--cache", hostile)
        assert code == 0, err
        assert "[bold]b[/oops]\\x1b[2J" in _plain(out), args
    import csv
    import io

    rows = list(csv.DictReader(io.StringIO(out)))  # still a CSV: its line ends are not escaped
    assert [r["backbone"] for r in rows] == ["fake:[bold]b[/oops]\\x1b[2J"] and "\\x0d" not in out


def test_errors_print_names_as_text(hostile, run_cli):
    code, _, err = run_cli("info", BACKBONE, "d", "nosplit", "--cache", hostile)
    line = _plain(err).strip()
    assert code == 1 and line.startswith("error: ") and len(line.splitlines()) == 1
    assert "[bold]b[/oops]\\x1b[2J" in line


def test_table_cells_and_titles_are_never_markup(capsys):
    from backbench.cli import table

    table([{"key": "[/oops]", "value": SOURCE}], ["key", "value"], title="[link=file:///x]t[/link]\x07")
    out = _plain(capsys.readouterr().out)
    assert "[/oops]" in out and "[link=file:///etc/passwd]x[/link]" in out and "[link=file:///x]t[/link]\\x07" in out
