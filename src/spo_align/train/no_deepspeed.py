"""Keep DeepSpeed out of runs that do not use it.

accelerate's `extract_model_from_parallel` (called by every `Accelerator.unwrap_model`, so by the Trainer's
constructor and its saves) runs ``from deepspeed import DeepSpeedEngine`` whenever the package is installed,
only to add that class to an `isinstance` check. Importing DeepSpeed costs seconds and memory and prints
"Setting accelerator to CPU" to stdout on machines without a GPU. A run without a DeepSpeed config cannot hold a
`DeepSpeedEngine`, so for its duration `without_deepspeed` makes that check see DeepSpeed as absent; runs
with a DeepSpeed config, and processes that already imported it, are left as they are.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
from collections.abc import Iterator

_PATCHED = (("accelerate.utils.other", "is_deepspeed_available"),)
"""(module, function name) pairs whose module-level binding decides whether DeepSpeed is imported."""


def _absent() -> bool:
    return False


@contextlib.contextmanager
def without_deepspeed(uses_deepspeed: bool) -> Iterator[None]:
    """For a run that does not use DeepSpeed (`uses_deepspeed` False), keep accelerate from importing it."""
    if uses_deepspeed or "deepspeed" in sys.modules:
        yield
        return
    saved = []
    for module_name, attribute in _PATCHED:
        module = importlib.import_module(module_name)
        if hasattr(module, attribute):
            saved.append((module, attribute, getattr(module, attribute)))
            setattr(module, attribute, _absent)
    try:
        yield
    finally:
        for module, attribute, original in saved:
            setattr(module, attribute, original)
