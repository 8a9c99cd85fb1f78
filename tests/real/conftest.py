"""The real SmolLM2-135M-Instruct end to end: its test data, recipes written beside it, `spo train` in this process.

Everything here runs the real model folder of `spo packaged-model smollm2-135m-instruct` (the session fixture
`smollm2_folder` of tests/conftest.py) on CPU, one thread, with a handful of short rows, so that the whole
directory stays within a few minutes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.real.real_runs import PAIR_RECIPE, PAIRS, SFT_RECIPE, SFT_ROWS, spo_train, write_jsonl


@pytest.fixture(scope="session")
def real_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding pairs.jsonl, sft.jsonl and the two recipes (pairs.yaml, sft.yaml) that read them."""
    folder = tmp_path_factory.mktemp("real_data")
    write_jsonl(folder / "pairs.jsonl", PAIRS)
    write_jsonl(folder / "sft.jsonl", SFT_ROWS)
    (folder / "pairs.yaml").write_text(yaml.safe_dump(PAIR_RECIPE, sort_keys=False), encoding="utf-8")
    (folder / "sft.yaml").write_text(yaml.safe_dump(SFT_RECIPE, sort_keys=False), encoding="utf-8")
    return folder


@pytest.fixture(scope="session")
def one_thread() -> None:
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def real_tokenizer(smollm2_folder: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_folder)


@pytest.fixture(scope="session")
def real_model(smollm2_folder: Path, one_thread: None) -> Any:
    """The folder loaded with plain transformers, fp32, eval mode: the independent side of every comparison."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm2_folder, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def sft_lora_output(real_data: Path, smollm2_folder: Path, tmp_path_factory: pytest.TempPathFactory, one_thread: None) -> Path:
    """Two LoRA SFT steps on the three conversations (one batch of all of them, in file order): shared by the
    first-loss check and the generation check."""
    return spo_train(real_data / "sft.yaml", smollm2_folder, tmp_path_factory.mktemp("real_sft") / "out")
