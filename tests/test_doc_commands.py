"""Every runnable command line of README.md and docs/*.md runs and exits 0 (the doc-test).

The rule: a line that starts with ``backbench `` inside a fenced code block (```` ```bash ````,
```` ```console ````, ```` ```sh ```` or no language) is run, continuation lines (``\\``) joined,
unless the block is directly preceded by a ``<!-- not run: REASON -->`` comment, which marks
blocks that cannot run offline on the bundled data (synopses with ``[optional]`` parts,
``/data/...`` paths, hub downloads, GPUs, the minutes-long battle). The lines run in one
temporary folder, README.md first and then the pages in ``mkdocs.yml``'s nav order, so a probe
finds the cache an extraction before it made. They run in this process (``backbench.cli.main``),
so the imports are paid once.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"(?:^<!--\s*not run:(?P<reason>[^>]*)-->\s*\n)?^```(?P<lang>[a-z]*)\n(?P<body>.*?)^```",
                   re.S | re.M)
SHELL = {"", "bash", "console", "sh", "shell"}


def doc_files() -> list[Path]:
    """README.md, then every page of mkdocs.yml's nav in its order, then any other docs/*.md."""
    nav = re.findall(r"^\s*-\s*[^:\n]+:\s*(\S+\.md)\s*$", (ROOT / "mkdocs.yml").read_text(), flags=re.M)
    pages = [ROOT / "docs" / p for p in nav]
    rest = sorted(p for p in (ROOT / "docs").glob("*.md") if p not in pages)
    return [ROOT / "README.md", *pages, *rest]


def command_lines(path: Path) -> tuple[list[str], list[tuple[str, str]]]:
    """(lines to run, [(line, reason) not run]) of one file's shell blocks."""
    run, skipped = [], []
    for m in FENCE.finditer(path.read_text()):
        if m["lang"] not in SHELL:
            continue
        body = re.sub(r"\\\n\s*", " ", m["body"])
        lines = [ln.strip() for ln in body.splitlines() if ln.strip().startswith("backbench ")]
        if m["reason"] is not None:
            skipped += [(ln, m["reason"].strip()) for ln in lines]
        else:
            run += lines
    return run, skipped


def all_lines() -> list[tuple[str, str]]:
    return [(f"{p.relative_to(ROOT)}", ln) for p in doc_files() for ln in command_lines(p)[0]]


def _commands() -> set[str]:
    import click
    import typer

    from backbench import cli

    cli._register_commands()
    root = typer.main.get_command(cli.app)
    return set(root.list_commands(click.Context(root)))


def test_the_docs_have_runnable_commands_and_the_quickstart_is_among_them():
    lines = [ln for _, ln in all_lines()]
    assert len(lines) >= 15
    readme = command_lines(ROOT / "README.md")[0]
    assert [ln.split()[1] for ln in readme] == ["extract", "extract", "probe"]  # the three-command quickstart


def test_every_skipped_block_says_why_and_names_a_real_command():
    commands = _commands()
    for path in doc_files():
        for line, reason in command_lines(path)[1]:
            assert reason, f"{path.name}: a 'not run' block without a reason: {line}"
            word = shlex.split(line, comments=True)[1]
            assert word in commands or word.startswith("-"), f"{path.name}: no command {word!r}: {line}"


def test_every_runnable_documented_command_exits_0(tmp_path, monkeypatch, capsys):
    from backbench.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("BACKBENCH_CACHE", raising=False)
    monkeypatch.delenv("BACKBENCH_MEMORY_LIMIT", raising=False)
    failures = []
    for where, line in all_lines():
        code = 0
        try:
            main(shlex.split(line, comments=True)[1:])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        err = capsys.readouterr().err
        if code != 0:
            failures.append(f"{where}: `{line}` exited {code}: {err.strip()[-300:]}")
    assert not failures, "\n".join(failures)
