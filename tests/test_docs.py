"""The docs check: README.md and docs/*.md link to files that exist, name configs that exist, and
show command lines that the tools' own argument parsers accept."""
import argparse
import re
import shlex

import pytest

from conftest import REPO
from helpers import run_script_in_process

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "tests" / "README.md"]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
CONFIG = re.compile(r"(?<![\w/.<])(configs/[\w./+-]+\.yaml)")
FENCE = re.compile(r"```[a-z]*\n(.*?)```", re.S)
SCRIPTS = re.compile(r"^(train_net\.py|demo/demo\.py|tools/\w+\.py)$")


def relative_links(text):
    for target in LINK.findall(text):
        if re.match(r"^[a-z]+://|^mailto:|^#", target):
            continue
        yield target.split("#")[0]


def test_pages_exist():
    names = {p.name for p in PAGES}
    assert {"getting_started.md", "datasets.md", "training.md", "deployment.md", "benchmarks.md",
            "fidelity.md", "architecture.md", "small_data_recipe.md"} <= names


def test_readme_is_a_front_door():
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 150
    first_screen = "\n".join(text.splitlines()[:50])
    assert "tools/main_job.py" in first_screen and "pytest" in first_screen


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_links_and_config_paths_resolve(page):
    text = page.read_text()
    broken = [t for t in relative_links(text) if not (page.parent / t).exists()]
    missing = sorted({c for c in CONFIG.findall(text) if not (REPO / c).exists()})
    assert not broken, f"{page.name}: broken relative links {broken}"
    assert not missing, f"{page.name}: configs that do not exist {missing}"


def shown_commands(text):
    """(line, argv) of every ``python SCRIPT ...`` command in the fenced code blocks of ``text``,
    continuation lines joined, ``&&`` chains split, comments and environment assignments dropped."""
    for block in FENCE.findall(text):
        for line in block.replace("\\\n", " ").splitlines():
            for part in line.split("&&"):
                try:
                    words = shlex.split(part, comments=True)
                except ValueError:  # an unbalanced quote: not a shell line
                    continue
                while words and "=" in words[0] and not words[0].startswith("-"):
                    words = words[1:]  # VAR=value prefixes
                if len(words) >= 2 and words[0].endswith("python") and SCRIPTS.match(words[1]):
                    yield part.strip(), words[1], words[2:]


class _Parsed(Exception):
    """Raised by the patched parse_args once a tool's own parser accepted the arguments."""


def _commands():
    return [(str(page.relative_to(REPO)), line, script, argv)
            for page in PAGES for line, script, argv in shown_commands(page.read_text())]


def test_shown_commands_are_found():
    scripts = {script for _, _, script, _ in _commands()}
    assert {"train_net.py", "demo/demo.py", "tools/export_model.py", "tools/benchmark.py", "tools/main_job.py"} <= scripts


@pytest.fixture
def parse_only(monkeypatch):
    """``parse_args`` parses as usual (exit status 2 with argparse's message on a bad option), then
    stops the script: nothing runs past its argument parsing."""
    real = argparse.ArgumentParser.parse_args

    def parse_and_stop(self, args=None, namespace=None):
        raise _Parsed(real(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_and_stop)


def test_shown_command_lines_parse_with_the_tools_own_parsers(parse_only):
    """Every ``python train_net.py / demo/demo.py / tools/*.py ...`` line of README and docs: the
    options exist (a renamed or misspelt option fails here)."""
    failures = []
    for page, line, script, argv in _commands():
        run = run_script_in_process(REPO / script, argv, cwd=REPO)
        if "_Parsed" not in run.stderr:
            failures.append(f"{page}: {line}\n    -> {run.stderr.strip().splitlines()[-1:]}")
    assert not failures, "\n".join(failures)


def test_the_check_catches_a_bad_option_a_bad_link_and_a_missing_config(tmp_path, parse_only):
    page = tmp_path / "page.md"
    page.write_text("[gone](nowhere.md) `configs/no_such.yaml`\n\n```bash\npython train_net.py --no-such-flag 1\n```\n")
    text = page.read_text()
    assert list(relative_links(text)) == ["nowhere.md"] and CONFIG.findall(text) == ["configs/no_such.yaml"]
    [(_, script, argv)] = list(shown_commands(text))
    run = run_script_in_process(REPO / script, argv, cwd=REPO)
    assert "_Parsed" not in run.stderr and "unrecognized arguments: --no-such-flag" in run.stderr
