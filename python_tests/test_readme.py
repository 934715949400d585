"""The code examples of the README and of every page of docs/, taken from the pages themselves (not
copied): every ```python block runs as a newcomer would paste it, and every `dsg ...` command line of
the ```bash blocks is accepted by the command's parser (running those is the job of the command-line
tests: they take minutes). Relative links between the pages must point at files that exist."""

from __future__ import annotations

import glob
import os
import re
import shlex

import pytest

from dsg_ext import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
PAGES = [README] + sorted(glob.glob(os.path.join(ROOT, "docs", "**", "*.md"), recursive=True))
MAX_README_LINES = 200  # the front door: what it is, install, one example, one table, links


def _text(path: str) -> str:
    with open(path) as f:
        return f.read()


def _blocks(language: str, path: str):
    return re.findall(rf"^```{language}\n(.*?)^```", _text(path), re.M | re.S)


def _name(path: str) -> str:
    return os.path.relpath(path, ROOT)


CONTINUES = "# continues the example above\n"


def _python_examples():
    """(page, index, code) per Python block; a block that starts with CONTINUES runs after the block
    before it on its page, as a reader running them in order would."""
    examples = []
    for p in PAGES:
        previous = ""
        for i, code in enumerate(_blocks("python", p)):
            if code.startswith(CONTINUES):
                assert previous, f"{_name(p)}: python example {i + 1} continues nothing"
                code = previous + code
            examples.append((_name(p), i, code))
            previous = code
    return examples


PYTHON = _python_examples()


def test_the_pages_have_examples():
    assert len(PAGES) >= 9, PAGES  # README + one page per task
    assert _blocks("python", README) and _blocks("bash", README)
    assert len(PYTHON) >= 4


def test_the_readme_is_a_short_front_door():
    assert _text(README).count("\n") <= MAX_README_LINES


def test_every_docs_page_starts_with_its_command():
    """Each task page opens with its title and then the command (or call) that does the task."""
    for path in PAGES[1:]:
        if os.path.basename(path) in ("results.md", "log.md"):
            continue  # measured tables, not a task
        body = _text(path).split("\n", 1)[1].lstrip()
        assert body.startswith("```"), _name(path)


def _anchors(path: str):
    """The heading anchors GitHub gives a page: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"^```.*?^```", "", _text(path), flags=re.M | re.S)  # a "# comment" in a block is no heading
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in re.findall(r"^#+ (.*)$", text, re.M)}


def test_relative_links_point_at_files_and_headings():
    broken = []
    for path in PAGES:
        for target, anchor in re.findall(r"\]\(([^)#\s]*)(?:#([^)\s]*))?\)", _text(path)):
            if "://" in target:
                continue
            linked = os.path.normpath(os.path.join(os.path.dirname(path), target)) if target else path
            if not os.path.exists(linked):
                broken.append(f"{_name(path)} -> {target}")
            elif anchor and linked.endswith(".md") and anchor not in _anchors(linked):
                broken.append(f"{_name(path)} -> {target}#{anchor}")
    assert broken == []


@pytest.mark.parametrize("page,index,code", PYTHON, ids=[f"{p}:{i + 1}" for p, i, _ in PYTHON])
def test_python_example_runs(page, index, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples may write files
    exec(compile(code, f"{page} python example {index + 1}", "exec"), {"__name__": "__readme__"})


def _dsg_commands():
    commands = []
    for block in (b for p in PAGES for b in _blocks("bash", p)):
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
