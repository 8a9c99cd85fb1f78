"""Batched generation of answers to test prompts, one JSONL file per model.

Python API (what `spo eval generate` and `spo experiment` call):

    specs = [parse_model_spec("out/sft=sft"), ModelSpec(Path("out/spo"), "spo")]
    prompts = load_prompts("HuggingFaceH4/ultrafeedback_binarized:test_prefs", n=200)
    settings = GenerationSettings(max_new_tokens=512, batch_size=8)   # greedy by default
    paths = generate(specs, prompts, settings, out_dir)                # -> [out_dir/sft.jsonl, ...]

`generate(models, prompts, settings, out_dir, *, skip_existing=True) -> list[Path]` writes
`<out_dir>/<name>.jsonl` per model (see `records.GenerationRecord`). A file that already holds
answers to exactly these prompts with the same settings is kept, so an interrupted experiment
resumes. Each prompt is sent as one user turn through the model's chat template with
`add_generation_prompt=True`, left-padded in batches. A directory holding `adapter_config.json`
is a LoRA output and is loaded on top of its base model through peft. The `vllm` engine is used
only when asked for and installed.

torch and transformers are imported inside the functions that need them.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from spo_align.eval.records import (
    EvalInputError,
    GenerationRecord,
    PromptRow,
    check_model_name,
    read_generation_file,
    read_prompt_jsonl,
    write_generation_file,
)

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

Engine = Literal["transformers", "vllm"]
DType = Literal["auto", "float32", "bfloat16", "float16"]


@dataclass(frozen=True)
class ModelSpec:
    """A model to evaluate: a local directory (full model or LoRA output) or a hub id, and its table name."""

    path: str
    name: str

    @property
    def is_lora(self) -> bool:
        return (Path(self.path) / "adapter_config.json").is_file()


@dataclass(frozen=True)
class GenerationSettings:
    """How answers are sampled. `temperature == 0` means greedy decoding (the default)."""

    max_new_tokens: int = 512
    batch_size: int = 8
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    engine: Engine = "transformers"
    dtype: DType = "auto"

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise EvalInputError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.batch_size < 1:
            raise EvalInputError(f"batch_size must be at least 1, got {self.batch_size}")
        if self.temperature < 0:
            raise EvalInputError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise EvalInputError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.engine not in ("transformers", "vllm"):
            raise EvalInputError(f"engine must be 'transformers' or 'vllm', got {self.engine!r}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise EvalInputError(f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def as_record(self) -> dict[str, Any]:
        """What is written beside every answer. Batch size and engine do not change greedy answers'
        meaning, but they are recorded so a reader can tell how the file was made."""
        return asdict(self)


def parse_model_spec(text: str) -> ModelSpec:
    """`PATH` or `PATH=NAME`; without a name, the last path component is the name."""
    path, sep, name = text.rpartition("=")
    if not sep:
        path, name = text, ""
    path = path.strip()
    if not path:
        raise EvalInputError(f"--model {text!r}: expected PATH or PATH=NAME")
    if not name:
        name = Path(path.rstrip("/")).name
    return ModelSpec(path=path, name=check_model_name(name))


def check_unique_names(models: Sequence[ModelSpec]) -> None:
    names = [m.name for m in models]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise EvalInputError(f"model names must be unique; repeated: {', '.join(dupes)} (use PATH=NAME)")


def load_prompts(source: str, n: int | None = None) -> list[PromptRow]:
    """Read prompts from a JSONL file, or from a hub dataset given as `name[:split]`.

    Hub datasets need a string `prompt` column; ids come from `prompt_id` (or `id`, else the row
    index). ultrafeedback_binarized: `HuggingFaceH4/ultrafeedback_binarized:test_prefs`.
    The first `n` rows are taken, in the file's or split's order.
    """
    if n is not None and n < 1:
        raise EvalInputError(f"--n must be at least 1, got {n}")
    from spo_align.recipe.paths import data_file_name

    path = Path(source)
    if path.is_file() or data_file_name(source).kind in (".jsonl", ".json"):  # compressed too: prompts.jsonl.gz
        return read_prompt_jsonl(path, n)
    return _load_hub_prompts(source, n)


def _load_hub_prompts(source: str, n: int | None) -> list[PromptRow]:
    import datasets

    name, _, split = source.partition(":")
    split = split or "test"
    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as exc:  # datasets raises many types; the message is what the user needs
        raise EvalInputError(f"cannot load dataset {name!r} split {split!r}: {exc}") from None
    if "prompt" not in ds.column_names:
        raise EvalInputError(f"dataset {name}:{split} has no 'prompt' column (columns: {ds.column_names})")
    if n is not None:
        ds = ds.select(range(min(n, len(ds))))
    id_column = next((c for c in ("prompt_id", "id") if c in ds.column_names), None)
    rows: list[PromptRow] = []
    for index, item in enumerate(ds):
        prompt = item["prompt"]
        if not isinstance(prompt, str):
            raise EvalInputError(f"dataset {name}:{split} row {index}: 'prompt' is not a string")
        row_id = str(item[id_column]) if id_column else str(index)
        reference = item.get("reference")
        rows.append(PromptRow(row_id, prompt, None if reference is None else str(reference)))
    if not rows:
        raise EvalInputError(f"dataset {name}:{split} is empty")
    return rows


def generate(
    models: Sequence[ModelSpec],
    prompts: Sequence[PromptRow],
    settings: GenerationSettings,
    out_dir: Path,
    *,
    skip_existing: bool = True,
) -> list[Path]:
    """Generate every model's answers to `prompts`; returns the written files in `models` order."""
    if not models:
        raise EvalInputError("no models given")
    if not prompts:
        raise EvalInputError("no prompts given")
    check_unique_names(models)
    for spec in models:  # before the first (possibly long) generation, not after it
        if not Path(spec.path).exists() and spec.path.startswith(("/", ".", "~")):
            raise EvalInputError(f"model directory not found (--model for {spec.name})", spec.path)
        problem = model_folder_problem(Path(spec.path))
        if problem is not None:
            raise EvalInputError(problem, spec.path)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for spec in models:
        path = out_dir / f"{spec.name}.jsonl"
        paths.append(path)
        if skip_existing and _is_complete(path, spec, prompts, settings):
            logger.info("%s: answers already complete in %s, skipping", spec.name, path)
            continue
        logger.info("%s: generating %d answers from %s", spec.name, len(prompts), spec.path)
        if settings.engine == "vllm":
            responses = _generate_vllm(spec, prompts, settings)
        else:
            responses = _generate_transformers(spec, prompts, settings)
        record_settings = {**settings.as_record(), "model_path": spec.path}
        records = [
            GenerationRecord(spec.name, row.id, row.prompt, response, row.reference, record_settings)
            for row, response in zip(prompts, responses, strict=True)
        ]
        write_generation_file(path, records)
        logger.info("%s: wrote %s", spec.name, path)
    return paths


def model_folder_problem(path: Path) -> str | None:
    """Why a local `--model` path holds no model to generate from: a file given instead of its folder, an
    unfinished spo-align run or unsealed checkpoint, a folder with no model config. None otherwise (a hub id too)."""
    from spo_align.run_folder import unfinished_run_problem

    if path.is_file():
        return f"is a file, not a model folder; give its folder ({path.parent})"
    if not path.is_dir():
        return None
    problem = unfinished_run_problem(path)
    if problem is not None:
        return problem.removeprefix(f"{path} ")
    if not any((path / name).is_file() for name in ("config.json", "adapter_config.json")):
        return "holds no model (no config.json or adapter_config.json)"
    return None


def _is_complete(path: Path, spec: ModelSpec, prompts: Sequence[PromptRow], settings: GenerationSettings) -> bool:
    if not path.is_file():
        return False
    try:
        records = read_generation_file(path)
    except EvalInputError:
        return False
    expected = {**settings.as_record(), "model_path": spec.path}
    return [(r.prompt_id, r.prompt) for r in records] == [(p.id, p.prompt) for p in prompts] and all(
        dict(r.settings) == expected and r.model == spec.name for r in records
    )


def load_model_and_tokenizer(spec: ModelSpec, dtype: DType = "auto") -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a model for generation; a LoRA output directory is merged onto its base model."""
    import torch

    torch_dtype: Any = dtype if dtype == "auto" else getattr(torch, dtype)
    from safetensors import SafetensorError

    try:
        model, tokenizer = _load(spec, torch_dtype)
    except (OSError, ValueError) as exc:  # what from_pretrained raises for a missing or foreign model
        raise EvalInputError(f"cannot load model {spec.name!r}: {' '.join(str(exc).split())}", spec.path) from None
    except SafetensorError as exc:  # a weights file cut short or damaged
        raise EvalInputError(
            f"cannot load model {spec.name!r}: its weights cannot be read ({' '.join(str(exc).split())}): a cut or "
            "half-written file?", spec.path
        ) from None
    if tokenizer.chat_template is None:
        raise EvalInputError(f"the tokenizer of model {spec.name!r} has no chat template", spec.path)
    model.eval()
    if torch.cuda.is_available():
        model.to("cuda")  # type: ignore[arg-type]
    return model, tokenizer


def _load(spec: ModelSpec, torch_dtype: Any) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if spec.is_lora:
        from peft import AutoPeftModelForCausalLM, PeftConfig

        base = PeftConfig.from_pretrained(spec.path).base_model_name_or_path
        logger.info("%s: LoRA adapter on top of %s", spec.name, base)
        peft_model = AutoPeftModelForCausalLM.from_pretrained(spec.path, dtype=torch_dtype)
        model = peft_model.merge_and_unload()
        tokenizer_source = spec.path if (Path(spec.path) / "tokenizer_config.json").is_file() else base
    else:
        model = AutoModelForCausalLM.from_pretrained(spec.path, dtype=torch_dtype)
        tokenizer_source = spec.path
    return model, AutoTokenizer.from_pretrained(tokenizer_source)


def render_prompts(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[PromptRow]) -> list[str]:
    """Each prompt as one user turn through the chat template, ready for the assistant's answer."""
    texts = []
    for row in prompts:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": row.prompt}], tokenize=False, add_generation_prompt=True
        )
        if not isinstance(text, str):
            raise TypeError(f"apply_chat_template(tokenize=False) returned {type(text).__name__}, not str")
        texts.append(text)
    return texts


def _generate_transformers(spec: ModelSpec, prompts: Sequence[PromptRow], settings: GenerationSettings) -> list[str]:
    import torch

    model, tokenizer = load_model_and_tokenizer(spec, settings.dtype)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    texts = render_prompts(tokenizer, prompts)
    # Longest first: batches of similar length waste less on padding. Answers go back in prompt order.
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    sampling: dict[str, Any] = (
        {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        if settings.greedy
        else {"do_sample": True, "temperature": settings.temperature, "top_p": settings.top_p, "top_k": None}
    )
    torch.manual_seed(settings.seed)
    responses: dict[int, str] = {}
    device = next(model.parameters()).device
    for start in range(0, len(order), settings.batch_size):
        batch = order[start : start + settings.batch_size]
        enc = tokenizer([texts[i] for i in batch], return_tensors="pt", padding=True, add_special_tokens=False)
        enc = {k: v.to(device) for k, v in enc.items()}
        with torch.no_grad():
            out = model.generate(  # type: ignore[operator]
                **enc,
                max_new_tokens=settings.max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
                **sampling,
            )
        new_tokens = out[:, enc["input_ids"].shape[1] :]
        for i, text in zip(batch, tokenizer.batch_decode(new_tokens, skip_special_tokens=True), strict=True):
            responses[i] = text
        logger.debug("%s: %d/%d answers", spec.name, len(responses), len(texts))
    return [responses[i] for i in range(len(texts))]


def _generate_vllm(spec: ModelSpec, prompts: Sequence[PromptRow], settings: GenerationSettings) -> list[str]:
    try:
        from vllm import LLM, SamplingParams
    except ImportError:
        raise EvalInputError("--engine vllm needs the vllm package (pip install vllm)") from None
    from transformers import AutoTokenizer

    lora_request = None
    model_path = spec.path
    if spec.is_lora:
        from peft import PeftConfig
        from vllm.lora.request import LoRARequest

        model_path = PeftConfig.from_pretrained(spec.path).base_model_name_or_path
        lora_request = LoRARequest(spec.name, 1, spec.path)
        rank = json.loads((Path(spec.path) / "adapter_config.json").read_text())["r"]
        llm = LLM(model=model_path, dtype=settings.dtype, seed=settings.seed, enable_lora=True, max_lora_rank=rank)
    else:
        llm = LLM(model=model_path, dtype=settings.dtype, seed=settings.seed)
    tokenizer_source = spec.path if (Path(spec.path) / "tokenizer_config.json").is_file() else model_path
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
    # Token ids, not text: the chat template already holds any BOS, and vLLM would add another.
    inputs: Any = [
        {"prompt_token_ids": tokenizer(text, add_special_tokens=False)["input_ids"]}
        for text in render_prompts(tokenizer, prompts)
    ]
    params = SamplingParams(
        temperature=settings.temperature,
        top_p=settings.top_p,
        max_tokens=settings.max_new_tokens,
        seed=settings.seed,
    )
    outputs = llm.generate(inputs, params, lora_request=lora_request)
    return [o.outputs[0].text for o in outputs]
