"""What the machine running the GPU check is: card, driver, CUDA, Python, and the package versions in use.

    python -m bench env OUT.json

Each fact is read on its own, so one that cannot be read (no nvidia-smi, a package that fails to import)
is recorded with its error and the others are still written.
"""

from __future__ import annotations

import importlib
import json
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

PACKAGES = (
    "torch", "transformers", "trl", "datasets", "peft", "accelerate", "tokenizers", "safetensors",
    "huggingface_hub", "pydantic", "pyarrow", "deepspeed", "flash_attn", "spo_align",
)  # fmt: skip
SMI_QUERY = "name,memory.total,driver_version,clocks.max.sm,power.limit"


def _nvidia_smi() -> dict[str, Any]:
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--query-gpu={SMI_QUERY}", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20, check=True,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError) as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    return {"query": SMI_QUERY, "rows": [line.strip() for line in out.stdout.splitlines() if line.strip()]}


def _torch() -> dict[str, Any]:
    try:
        import torch
    except Exception as exc:  # a broken install is a fact to report, not a reason to stop
        return {"error": f"{type(exc).__name__}: {exc}"}
    facts: dict[str, Any] = {"version": torch.__version__, "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        facts.update(
            device_name=props.name,
            capability=f"{props.major}.{props.minor}",
            memory_gb=props.total_memory / 1e9,
            multiprocessors=props.multi_processor_count,
            bf16_supported=torch.cuda.is_bf16_supported(),
        )
    return facts


def _version(name: str) -> str:
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError:
        return "not installed"
    except Exception as exc:  # noqa: BLE001 - importing a package can raise anything
        return f"import failed: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
    where = Path(getattr(module, "__file__", "") or "").parent
    return f"{getattr(module, '__version__', '?')} ({where})"


def collect() -> dict[str, Any]:
    return {
        "python": sys.version.split()[0],
        "executable": sys.executable,
        "platform": platform.platform(),
        "nvidia_smi": _nvidia_smi(),
        "torch": _torch(),
        "packages": {name: _version(name) for name in PACKAGES},
    }


def write_facts(out: Path) -> dict[str, Any]:
    facts = collect()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(facts, indent=1) + "\n", encoding="utf-8")
    return facts
