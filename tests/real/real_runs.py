"""The real-model tests' data and how they run `spo train`: four preference pairs, three SFT conversations, the
recipes that read them, and `spo train` in this process on the real model folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

PAIRS: list[dict[str, Any]] = [
    {"prompt": [{"role": "user", "content": "What is the capital of France?"}], "chosen": "Paris.", "rejected": "London."},
    {
        "prompt": [
            {"role": "system", "content": "You answer in one word."},
            {"role": "user", "content": "What colour is the sky?"},
        ],
        "chosen": "Blue.",
        "rejected": "Green.",
    },
    # Blank lines first: on this byte-level BPE they tokenize differently after "assistant\n" than alone.
    {"prompt": [{"role": "user", "content": "Name a prime number."}], "chosen": "\n\nSeven.", "rejected": "Eight is prime."},
    {
        "prompt": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "How many legs does a cat have?"},
        ],
        "chosen": "Four.",
        "rejected": "Three.",
    },
]
"""Four pairs: the template's default system turn (rows 0, 2, 3) and a system turn of its own (row 1), a
blank-line answer (row 2), and a multi-turn prompt (row 3)."""

SFT_ROWS: list[dict[str, Any]] = [
    {"messages": [{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "Paris."}]},
    {
        "messages": [
            {"role": "system", "content": "You answer in one word."},
            {"role": "user", "content": "What colour is the sky?"},
            {"role": "assistant", "content": "Blue."},
        ]
    },
    {
        "messages": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello! How can I help?"},
            {"role": "user", "content": "How many legs does a cat have?"},
            {"role": "assistant", "content": "A cat has four legs."},
        ]
    },
]
"""Three conversations: default and own system turn, and two assistant turns in one conversation."""

PAIR_RECIPE: dict[str, Any] = {
    "description": "real SmolLM2-135M-Instruct, one SPO step on four pairs (tests/real)",
    "stage": "preference",
    "model": {"name_or_path": "set-by-the-test", "dtype": "float32"},
    "data": {
        "train": [{"path": "pairs.jsonl", "format": "pairs"}],
        "max_length": 128,
        "shuffle": False,
    },
    "loss": {"type": "spo", "beta": 0.2, "alpha": 1.0},
    "training": {
        "learning_rate": 1.0e-5,
        "lr_scheduler": "constant",
        "max_steps": 1,
        "per_device_batch_size": len(PAIRS),
        "seed": 0,
        "logging_steps": 1,
        "save_steps": 100,
        "cpu_threads": 1,
    },
    "output": {"dir": "set-by-the-test", "report_to": ["none"]},
}

SFT_RECIPE: dict[str, Any] = {
    "description": "real SmolLM2-135M-Instruct, two LoRA SFT steps on three conversations (tests/real)",
    "stage": "sft",
    "model": {"name_or_path": "set-by-the-test", "dtype": "float32"},
    "data": {"train": [{"path": "sft.jsonl", "format": "messages"}], "max_length": 128, "shuffle": False},
    "adapter": {"type": "lora", "r": 8, "alpha": 16, "dropout": 0.0},
    "training": {
        "learning_rate": 1.0e-4,
        "lr_scheduler": "constant",
        "max_steps": 2,
        "per_device_batch_size": len(SFT_ROWS),
        "seed": 0,
        "logging_steps": 1,
        "save_steps": 100,
        "cpu_threads": 1,
    },
    "output": {"dir": "set-by-the-test", "report_to": ["none"]},
}


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def real_plan(recipe: Path, folder: Path, out: Path, *overrides: str) -> Any:
    """The recipe resolved exactly as `spo train` resolves it, on the real model folder."""
    from spo_align.recipe.load import load_recipe
    from spo_align.recipe.resolve import resolve

    sets = [f"model.name_or_path={folder}", f"output.dir={out}", *overrides]
    return resolve(load_recipe(recipe, sets), recipe, "cpu")  # type: ignore[arg-type]


def spo_train(recipe: Path, folder: Path, out: Path, *overrides: str) -> Path:
    """`spo train RECIPE --set model.name_or_path=FOLDER --set output.dir=OUT ...` in this process."""
    from typer.testing import CliRunner

    from spo_align.cli import app

    sets = [f"model.name_or_path={folder}", f"output.dir={out}", *overrides]
    result = CliRunner().invoke(app, ["train", str(recipe), *(a for s in sets for a in ("--set", s))])
    assert result.exit_code == 0, result.output
    return out


def logged_steps(out: Path) -> list[dict[str, Any]]:
    """The per-step records of metrics.jsonl (the closing summary left out)."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "loss" in r]
