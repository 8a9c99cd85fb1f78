"""The README's two opening commands are the ones CI and new users run: keep them honest."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```(?:bash|sh)\n(.*?)```", text, flags=re.S)
    return [line.strip() for block in blocks[:2] for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_ci_runs_the_readme_test_command_verbatim():
    commands = _readme_commands()
    assert len(commands) >= 2, "README must open with two command blocks"
    ci = (ROOT / ".ci" / "run").read_text()
    assert commands[1] in ci.splitlines(), "the README's test command must appear verbatim in .ci/run"


def test_readme_first_command_sets_up_cpu_torch_and_trains_the_tiny_default():
    first = _readme_commands()[0]
    assert "pip install torch==2.13.0" in first  # the CPU wheel, before anything pulls a CUDA build
    assert "spo train recipes/tiny/" in first
    for recipe in re.findall(r"spo train (\S+)", first):
        assert (ROOT / recipe).is_file(), recipe


def _spo_lines() -> list[list[str]]:
    """Every `spo ...` line of the README's code blocks, trailing comments dropped, tokenized."""
    import shlex

    text = (ROOT / "README.md").read_text()
    lines = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S):
        for line in block.splitlines():
            for part in line.split("&&"):
                part = part.strip()
                if part.startswith("spo "):
                    lines.append(shlex.split(part, comments=True)[1:])
    return lines


def test_readme_shows_the_workflow_commands():
    commands = {argv[0] for argv in _spo_lines()}
    assert {"new", "validate", "resolve", "train", "plot", "eval", "experiment"} <= commands


def test_every_spo_line_in_the_readme_parses_against_the_real_cli():
    import typer.main

    from spo_align.cli import app

    group = typer.main.get_command(app)
    context_class = group.context_class  # typer may ship its own click: use the group's classes
    for argv in _spo_lines():
        node, rest = group, list(argv)
        parent = context_class(group, info_name="spo")
        name = "spo"
        while hasattr(node, "commands"):  # a group: descend to the named subcommand
            if node is not group:
                parent = context_class(node, info_name=name, parent=parent)
            name, rest = rest[0], rest[1:]
            sub = node.commands.get(name)
            assert sub is not None, f"`spo {' '.join(argv)}`: no command {name!r}"
            node = sub
        node.make_context(name, rest, parent=parent)  # raises on an unknown option or a bad argument count
