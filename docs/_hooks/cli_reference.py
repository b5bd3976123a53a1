"""mkdocs hook: the CLI reference, generated from the typer app at build time so it cannot drift.

``docs/cli.md`` holds the marker ``<!-- cli-reference -->``; this hook replaces it with one
section per command (usage, help text, arguments and options), walked from the same click
command tree ``backbench --help`` prints.
"""

from __future__ import annotations

import re
from typing import Any

MARKER = "<!-- cli-reference -->"


def on_page_markdown(markdown: str, page: Any, **_: Any) -> str:
    if MARKER not in markdown:
        return markdown
    return markdown.replace(MARKER, cli_reference())


def cli_reference() -> str:
    import click
    import typer

    from backbench import cli

    cli._register_commands()
    root = typer.main.get_command(cli.app)
    ctx = click.Context(root, info_name="backbench")
    sections = [_section("backbench", root, ctx, level=2, commands=root.list_commands(ctx))]
    for name in root.list_commands(ctx):
        command = root.get_command(ctx, name)
        if command is not None and not getattr(command, "hidden", False):
            sections.append(_section(f"backbench {name}", command, click.Context(command, info_name=name, parent=ctx),
                                     level=2))
    return "\n\n".join(sections)


def _section(path: str, command: Any, ctx: Any, *, level: int, commands: list[str] | None = None) -> str:
    args = [p for p in command.params if p.param_type_name == "argument"]
    opts = [p for p in command.params if p.param_type_name == "option" and not getattr(p, "hidden", False)]
    usage = " ".join([path, "[OPTIONS]" if opts else "", *(_arg_usage(a) for a in args),
                      "COMMAND [ARGS]..." if commands else ""])
    lines = [f"{'#' * level} `{path}`", "", "```text", re.sub(r"\s+", " ", usage).strip(), "```", ""]
    lines += _help(command.help or "")
    if commands:
        lines += ["", "| command | what it does |", "|---|---|"]
        for name in commands:
            sub = command.get_command(ctx, name)
            first = (sub.help or "").strip().split("\n\n")[0].replace("\n", " ")
            lines.append(f"| [`{name}`](#backbench-{name}) | {_cell(first)} |")
    if args:
        lines += ["", "| argument | required | help |", "|---|---|---|"]
        lines += [f"| `{a.name.upper()}` | {'yes' if a.required else 'no'} | {_cell(getattr(a, 'help', '') or '')} |"
                  for a in args]
    if opts:
        lines += ["", "| option | default | help |", "|---|---|---|"]
        lines += [f"| {_names(o)} | {_default(o)} | {_cell(_option_help(o))} |" for o in opts]
    return "\n".join(lines)


def _help(text: str) -> list[str]:
    """The help text's paragraphs; an ``Example:`` paragraph becomes a code block."""
    out: list[str] = []
    for para in text.strip().split("\n\n"):
        if para.lstrip().startswith("Example:"):
            body = para.lstrip()[len("Example:"):]
            examples = [ln.strip() for ln in body.splitlines() if ln.strip()]
            out += ["Example:", "", "```bash", *examples, "```", ""]
        else:
            out += [_escape(" ".join(ln.strip() for ln in para.splitlines())), ""]
    return out


def _arg_usage(arg: Any) -> str:
    name = arg.name.upper() + ("..." if arg.nargs == -1 else "")
    return name if arg.required else f"[{name}]"


def _names(option: Any) -> str:
    names = [*option.opts, *getattr(option, "secondary_opts", [])]
    return ", ".join(f"`{n}`" for n in names)


def _default(option: Any) -> str:
    default = option.default
    if getattr(option, "is_flag", False) or default in (None, False, (), []) or callable(default):
        return ""
    return f"`{default}`"


def _option_help(option: Any) -> str:
    text = (getattr(option, "help", None) or "").strip()
    notes = []
    if option.required:
        notes.append("required")
    if option.multiple:
        notes.append("several values")
    if getattr(option, "envvar", None):
        notes.append(f"env: `{option.envvar}`")
    return text + (f" ({'; '.join(notes)})" if notes else "")


def _cell(text: str) -> str:
    return _escape(re.sub(r"\s+", " ", text).strip())


def _escape(text: str) -> str:
    """Help text as literal Markdown: brackets, emphasis marks, angle brackets and pipes escaped
    (backticks are kept: help texts use them for code)."""
    parts = re.split(r"(`[^`]*`)", text)  # odd parts are code spans, kept as they are
    for i in range(0, len(parts), 2):
        plain = parts[i].replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
        parts[i] = re.sub(r"([\\\[\]*_|])", r"\\\1", plain)
    return "".join(p if i % 2 == 0 else p.replace("|", "\\|") for i, p in enumerate(parts))
