"""The command line a new user meets: usage errors, options with several values, --version,
whole values in `info`, the C grid in `results`, a --limit that grew (issue 18: 12, 13, 19)."""

from __future__ import annotations

import contextvars
import json
import re
import shlex
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
import typer

from backbench.cli import _register_commands, app, expand_multi

README = Path(__file__).resolve().parents[1] / "README.md"
RESNET = "timm:test_resnet@random"


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err and "unexpected" not in err, err
    return lines[0]


# 12: usage errors ------------------------------------------------------------------------------

@pytest.mark.parametrize("args, says", [
    (["prob", "-b", "x", "-d", "y"], "No such command 'prob'. Did you mean 'probe'?"),
    (["probe", "-b", "x", "-d", "y", "--train", "a", "--eval", "b", "--Cs", "0.1"], "No such option: --Cs"),
    (["probe", "-b", "x", "-d", "y", "--eval", "b"], "Missing option '--train'"),
    (["knn", "-b", "x", "-d", "y", "--train", "a", "--eval", "b", "-k", "ten"], "Invalid value for '-k'"),
    (["extract", RESNET, "--data", "digits", "--dataset", "d", "--split", "s", "--limit", "0"], "--limit"),
])
def test_usage_errors_are_clicks_message_on_one_line_with_exit_2(args, says, run_cli):
    code, _, err = run_cli(*args)
    line = _one_line(err)
    assert code == 2 and line.startswith("error: ") and says in line


@pytest.mark.parametrize("args, says", [
    (["extract", RESNET, "--data", "digits", "--dataset", "d", "--split", "s", "--dtype", "int8"], "--dtype 'int8'"),
    (["extract", RESNET, "--data", "digits", "--dataset", "d", "--split", "s", "--shard", "5/2"], "--shard '5/2'"),
    (["extract", RESNET, "--data", "digits", "--dataset", "d", "--split", "s", "--on-error", "x"], "--on-error 'x'"),
    (["probe", "-b", "x", "-d", "y", "--train", "a", "--eval", "b", "--C", "abc"], "--C 'abc'"),
    (["probe", "-b", "x", "-d", "y", "--train", "a", "--eval", "b", "--C", "-1"], "--C values must be positive"),
    (["retrieve", "-b", "x", "-d", "y", "--query", "a", "--gallery", "b", "--index", "lsh"], "--index 'lsh'"),
    (["ood", "-b", "x", "--id-dataset", "d", "--id-train", "a", "--id-test", "b"], "give --ood"),
    (["report", "--format", "xml"], "--format 'xml'"),
    (["battle", "--workers", "2", "--scheduler", "tcp://h:1"], "not both"),
    (["models", "--source", "nosuch"], "unknown source 'nosuch'"),
])
def test_bad_option_values_are_usage_errors(args, says, run_cli, tmp_path, monkeypatch):
    """Told before anything is opened or created: exit 2, one line, nothing left behind."""
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(*args, *(["--cache", str(tmp_path / "c.zarr")] if args[0] not in ("models",) else []))
    assert code == 2 and says in _one_line(err) and not any(tmp_path.iterdir())


def test_no_such_option_suggests_the_close_one(run_cli):
    code, _, err = run_cli("probe", "-b", "x", "-d", "y", "--train", "a", "--eval", "b", "--Cs", "0.1")
    assert code == 2 and "--C" in _one_line(err).split("No such option: --Cs", 1)[1]


def test_usage_error_from_the_installed_command(tmp_path):
    """The real entry point (a new process): `backbench prob` is a usage error, exit 2, one line."""
    run = subprocess.run([sys.executable, "-m", "backbench", "prob"], capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 2 and "Did you mean 'probe'?" in _one_line(run.stderr)


# 13: options with several values ----------------------------------------------------------------

def _root() -> typer.main.TyperGroup:
    _register_commands()
    return typer.main.get_command(app)


def _parse(argv: list[str], resilient: bool = False) -> dict:
    """Parse ``backbench ARGV`` as main() does, up to the command's parameters; nothing runs."""
    root, args = _root(), expand_multi(argv)
    command = root.commands[args[0]]

    def parse() -> dict:  # option callbacks may set context variables: keep them in this context
        return command.make_context(args[0], args[1:], resilient_parsing=resilient).params

    return contextvars.copy_context().run(parse)


def _multi_options() -> list[tuple[str, object]]:
    return [(name, p) for name, cmd in sorted(_root().commands.items()) for p in cmd.params
            if p.param_type_name == "option" and p.multiple]


@pytest.mark.parametrize("name, param", _multi_options(), ids=lambda v: getattr(v, "name", v))
def test_every_multi_value_option_takes_its_values_the_same_way(name, param):
    """`--opt A B`, `--opt A --opt B` and a negative number as a value all parse to [A, B]."""
    flag = param.opts[0]
    values = ["-1", "-4"] if param.bare_type is int else ["1", "2"]
    for argv in ([name, flag, *values], [name, flag, values[0], flag, values[1]]):
        got = _parse(argv, resilient=True)[param.name]
        if all(isinstance(v, float) for v in got):  # --lr 1 2, --scales 1 2: numbers
            assert [float(v) for v in got] == [float(v) for v in values], argv
        else:
            assert [str(v) for v in got] == values, argv


def test_open_set_takes_several_classes_as_the_readme_writes_it(digits_cache, run_cli):
    code, out, err = run_cli("ood", "-b", "fake:pixels", "--id-dataset", "digits", "--id-train", "train",
                             "--id-test", "test", "--open-set", "8", "9", "--scores", "msp", "energy",
                             "--cache", digits_cache, "--json")
    assert code == 0, err
    (record,) = json.loads(out)
    assert record["task"] == "open-set" and sorted(record["params"]["holdout"]) == ["8", "9"]
    assert sorted(record["metrics"]["scores"]) == ["energy", "msp"]


def test_negative_layers_and_a_double_dash():
    args = expand_multi(["extract", "a", "--layers", "-1", "-4", "--data", "digits", "--", "-x"])
    assert args == ["extract", "a", "--layers", "-1", "--layers", "-4", "--data", "digits", "--", "-x"]


def _readme_commands() -> list[str]:
    """Every `backbench ...` line of README.md's fenced code blocks, continuation lines joined."""
    text, lines = README.read_text(), []
    for block in re.findall(r"^```[a-z]*\n(.*?)^```", text, flags=re.S | re.M):
        joined = re.sub(r"\\\n\s*", " ", block)
        lines += [ln.strip() for ln in joined.splitlines() if ln.strip().startswith("backbench ")]
    return lines


PLACEHOLDER = {"N": "2", "I/N": "0/2", "8GB": "8GB"}


def _variants(line: str) -> list[list[str]]:
    """A synopsis line as concrete command lines: without its [optional] parts, then with each
    alternative of each; `a|b` values take the first, `N` and `I/N` become numbers."""
    tokens = [t for t in shlex.split(line, comments=True)[1:] if t != "..."]
    base, groups, current = [], [], None
    for t in tokens:
        if t.startswith("[") and current is None:
            current, t = [[]], t[1:]
        if current is None:
            base.append(t)
            continue
        end = t.endswith("]")
        t = t[:-1] if end else t
        if t == "|":
            current.append([])
        elif t:
            current[-1].append(t)
        if end:
            groups.append((len(base), current))
            current = None
    concrete = lambda ts: [PLACEHOLDER.get(t, t.split("|")[0].removesuffix("...")) for t in ts]  # noqa: E731
    out = [concrete(base)]
    for at, alternatives in groups:
        out += [concrete(base[:at] + alt + base[at:]) for alt in alternatives]
    return out


def test_readme_has_the_commands_this_test_reads():
    commands = _readme_commands()
    assert len(commands) >= 20 and any("--open-set ship truck" in c for c in commands)
    assert any("--layers -1 -2 -3 -4" in c for c in commands)


@pytest.mark.parametrize("line", [c for c in _readme_commands() if " | " not in c.split("[")[0]])
def test_every_readme_command_line_parses(line):
    """Each README command line's option shape parses: multi-value options get every value."""
    for argv in _variants(line):
        params, given = _parse(argv), {}
        multi = {o: p.name for name, p in _multi_options() if name == argv[0] for o in p.opts}
        for i, t in enumerate(argv):
            if t in multi:  # the values that follow, up to the next option, all arrive
                values = given.setdefault(multi[t], [])
                for v in argv[i + 1:]:
                    if v.startswith("-") and not re.match(r"^-\d", v):
                        break
                    values.append(v)
        for name, values in given.items():
            got = params[name]
            if all(isinstance(v, float) for v in got):  # --scales 4 2 1 0.5: numbers
                assert [float(v) for v in got] == [float(v) for v in values], (argv, name)
            else:
                assert [str(v) for v in got] == values, (argv, name)


# 19: --version, whole values, the C grid, a grown --limit ----------------------------------------

def test_version(run_cli):
    code, out, _ = run_cli("--version")
    assert code == 0 and out.strip() == f"backbench {version('backbench')}"


def test_info_piped_prints_every_value_whole(digits_cache, run_cli):
    import zarr

    from backbench.store import Cache

    long = {"input_size": [3, 224, 224], "mean": [0.48145466, 0.4578275, 0.40821073] * 8, "note": "x" * 300}
    path = Cache(digits_cache).group("fake:pixels", "digits", "train").path
    zarr.open_group(digits_cache, mode="r+")[path].attrs["preprocess"] = long
    code, out, _ = run_cli("info", "fake:pixels", "digits", "train", "--cache", digits_cache)
    assert code == 0 and "…" not in out and "..." not in out
    lines = dict(ln.split(": ", 1) for ln in out.splitlines() if ": " in ln)
    assert json.loads(lines["preprocess"]) == long
    assert json.loads(lines["classes"]) == [str(c) for c in range(10)]


def test_results_shows_the_C_grid_and_the_chosen_C(digits_cache, run_cli):
    code, _, err = run_cli("probe", "-b", "fake:pixels", "-d", "digits", "--train", "train", "--eval", "test",
                           "--val", "val", "--C", "0.001", "0.1", "10", "--cache", digits_cache)
    assert code == 0, err
    code, out, _ = run_cli("results", "--cache", digits_cache)
    from backbench.store.results import ResultsLog
    from backbench.store import Cache

    (record,) = ResultsLog(Cache(digits_cache)).records()
    assert code == 0 and record["params"]["Cs"] == [0.001, 0.1, 10.0]
    assert "Cs=0.001,0.1,10" in out and f"chosen_C={record['chosen_C']:g}" in out


def test_growing_a_limited_extraction_mentions_limit(cache_path, run_cli):
    base = ["extract", RESNET, "--data", "digits", "--dataset", "d", "--split", "test", "--cache", cache_path,
            "--workers", "0"]
    code, _, err = run_cli(*base, "--limit", "20")
    assert code == 0, err
    code, _, err = run_cli(*base)
    line = _one_line(err)
    assert code == 1 and "holds 20 samples, this run asks for 540" in line and "--limit 20" in line
    assert "different dataset_fingerprint" in line and "--overwrite" in line
