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
