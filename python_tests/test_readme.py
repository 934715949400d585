"""The README's code examples, taken from the README itself (not copied): every ```python block runs
as a newcomer would paste it, and every `dsg ...` command line of the ```bash blocks is accepted by
the command's parser (running those is the job of the command-line tests: they take minutes)."""

from __future__ import annotations

import os
import re
import shlex

import pytest

from dsg_ext import cli

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def _blocks(language: str):
    with open(README) as f:
        text = f.read()
    return re.findall(rf"^```{language}\n(.*?)^```", text, re.M | re.S)


PYTHON = _blocks("python")


def test_the_readme_has_examples():
    assert len(PYTHON) >= 3 and _blocks("bash")


@pytest.mark.parametrize("index", range(len(PYTHON)))
def test_python_example_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples may write files
    code = compile(PYTHON[index], f"README.md python example {index + 1}", "exec")
    exec(code, {"__name__": "__readme__"})


def _dsg_commands():
    commands = []
    for block in _blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("#")[0].strip()
            if "dsg " in line:
                line = line[line.index("dsg "):]
                commands.append(shlex.split(line.split("&&")[0])[1:])
            elif "-m dsg_ext " in line:
                commands.append(shlex.split(line[line.index("-m dsg_ext ") + len("-m dsg_ext "):]))
    return [c for c in commands if "..." not in c]  # "..." elides options: nothing to check


@pytest.mark.parametrize("argv", _dsg_commands(), ids=lambda a: " ".join(a)[:60])
def test_command_line_example_parses(argv):
    args = cli.build_parser().parse_args(argv)
    assert callable(args.func)
