"""A model's shape without torch and without a network: what the memory estimate (`recipe/memory.py`) reads.

Where the numbers come from, in order:
- a local model folder with a `config.json` (an earlier stage's output, a downloaded model);
- a local folder holding only a LoRA adapter: its `adapter_config.json` names the base, whose shape is used;
- a local folder that does not exist yet: the recipe that writes it (its `output.dir`), followed to the
  model that recipe starts from;
- `tiny:<name>`: the embedded tiny model (`spo_align.tiny`);
- a hub id in `KNOWN_SHAPES`, the models the shipped recipes name, written from their public `config.json`.
Anything else is `NoShape`, with one line saying why and how to get an estimate.

Parameter counts follow the Llama layout (embedding; per layer q/k/v/o projections, a gated MLP, two RMSNorms;
a final norm; an LM head unless tied), which Mistral, Qwen2 (q/k/v biases) and Qwen3 (q/k norms) share.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from spo_align.recipe.paths import TINY_PREFIX

LLAMA_LAYOUT_TYPES = ("llama", "mistral", "qwen2", "qwen3")
"""model_type values whose parameters `ModelShape` counts exactly; others are estimated as if they were Llama."""

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ModelShape:
    """The numbers of a decoder-only transformer that decide its memory."""

    source: str
    """Where the numbers were read (a file, the built-in table, the tiny model)."""
    model_type: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool
    qkv_bias: bool = False
    qk_norm: bool = False

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each projection of one layer."""
        h, q, kv = self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        i = self.intermediate_size
        return {
            "q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h),
        }

    def layer_params(self) -> int:
        weights = sum(fan_in * fan_out for fan_in, fan_out in self.linears().values())
        bias = (self.num_heads + 2 * self.num_kv_heads) * self.head_dim if self.qkv_bias else 0
        norms = 2 * self.hidden_size + (2 * self.head_dim if self.qk_norm else 0)
        return weights + bias + norms

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def total_params(self) -> int:
        """Every parameter once (a tied head shares the embedding)."""
        head = 0 if self.tie_word_embeddings else self.embedding_params
        return self.embedding_params + self.num_layers * self.layer_params() + self.hidden_size + head

    @property
    def linear_params(self) -> int:
        """Parameters used through a matrix multiply (autocast casts these): every projection and the head."""
        per_layer = sum(fan_in * fan_out for fan_in, fan_out in self.linears().values())
        return self.num_layers * per_layer + self.embedding_params

    @property
    def largest_module_params(self) -> int:
        """The most parameters one module holds directly (DeepSpeed's `largest_layer_params`): the embedding or
        head, or the biggest projection with its bias."""
        biggest = 0
        for name, (fan_in, fan_out) in self.linears().items():
            bias = fan_out if self.qkv_bias and name in ("q_proj", "k_proj", "v_proj") else 0
            biggest = max(biggest, fan_in * fan_out + bias)
        return max(biggest, self.embedding_params)

    def adapted(self, target_modules: list[str] | str) -> list[str]:
        """The projections a LoRA adapter on `target_modules` wraps (all-linear: every projection, never the LM
        head, as peft does). Names match a projection by their last dotted part."""
        if isinstance(target_modules, str):
            names = set(PROJECTIONS) if target_modules == "all-linear" else {target_modules.split(".")[-1]}
        else:
            names = {name.split(".")[-1] for name in target_modules}
        return [name for name in PROJECTIONS if name in names]

    def lora_params(self, rank: int, target_modules: list[str] | str) -> int:
        """Trainable parameters of a LoRA adapter of `rank` on `target_modules`: r x (in + out) per projection."""
        linears = self.linears()
        return self.num_layers * sum(rank * sum(linears[name]) for name in self.adapted(target_modules))


@dataclass(frozen=True)
class NoShape:
    """No shape could be found; `reason` says why and how to get one."""

    reason: str


Shape = ModelShape | NoShape


def _shape(source: str, model_type: str, hidden: int, layers: int, heads: int, kv: int, inter: int, vocab: int,
           tied: bool, **extra: Any) -> ModelShape:
    return ModelShape(source, model_type, hidden, layers, heads, kv, hidden // heads, inter, vocab, tied, **extra)


_TABLE = "built-in table of public config.json values"
KNOWN_SHAPES: dict[str, ModelShape] = {
    "Qwen/Qwen2.5-7B-Instruct": _shape(_TABLE, "qwen2", 3584, 28, 28, 4, 18944, 152064, False, qkv_bias=True),
    "Qwen/Qwen2.5-7B": _shape(_TABLE, "qwen2", 3584, 28, 28, 4, 18944, 152064, False, qkv_bias=True),
    "meta-llama/Llama-3.1-8B-Instruct": _shape(_TABLE, "llama", 4096, 32, 32, 8, 14336, 128256, False),
    "meta-llama/Llama-3.1-8B": _shape(_TABLE, "llama", 4096, 32, 32, 8, 14336, 128256, False),
    "HuggingFaceTB/SmolLM2-135M-Instruct": _shape(_TABLE, "llama", 576, 30, 9, 3, 1536, 49152, True),
}
"""Hub ids the shipped recipes name (and their base models), from each model's public config.json."""


def tiny_shape() -> ModelShape:
    """The embedded tiny model (`spo_align.tiny`): every `tiny:<name>` is this shape."""
    from spo_align.tiny import CHARACTERS, SPECIAL_TOKENS, TinyModelShape

    dims = TinyModelShape()
    vocab = len(dict.fromkeys((*SPECIAL_TOKENS, *CHARACTERS)))
    return _shape(
        "spo_align.tiny (embedded tiny model)", "llama", dims.hidden_size, dims.num_hidden_layers,
        dims.num_attention_heads, dims.num_attention_heads, dims.intermediate_size, vocab, True,
    )


class ConfigError(ValueError):
    """A config.json that cannot be read as a decoder shape (the message says which key)."""


def shape_from_config(config: dict[str, Any], source: str) -> ModelShape:
    """The shape a Hugging Face `config.json` describes; `ConfigError` when a needed key is missing."""
    if "text_config" in config and "hidden_size" not in config:
        raise ConfigError(f"{source} describes a multimodal model (text_config); only decoder-only LMs are estimated")

    def number(key: str, default: int | None = None) -> int:
        value = config.get(key, default)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"{source}: '{key}' is {'missing' if key not in config else repr(value)}")
        return value

    model_type = str(config.get("model_type", "unknown"))
    hidden, heads = number("hidden_size"), number("num_attention_heads")
    head_dim = config.get("head_dim")
    return ModelShape(
        source=source,
        model_type=model_type,
        hidden_size=hidden,
        num_layers=number("num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=number("num_key_value_heads", heads),
        head_dim=head_dim if isinstance(head_dim, int) and head_dim > 0 else hidden // heads,
        intermediate_size=number("intermediate_size"),
        vocab_size=number("vocab_size"),
        # transformers' Llama, Mistral and Qwen configs default to untied heads
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        qkv_bias=model_type == "qwen2" or bool(config.get("attention_bias", False)),
        qk_norm=model_type == "qwen3",
    )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} is not a JSON object")
    return data


Writers = dict[Path, tuple[str, Path]]
"""Output folder -> (the model its recipe starts from, as written; that recipe's file): the folders recipes write."""

_HOW = "point model.name_or_path at a local folder holding the model's config.json to get an estimate"


def find_shape(name_or_path: str, writers: Writers, *, seen: tuple[str, ...] = ()) -> Shape:
    """The shape of the model a recipe names (see the module doc for the order); never raises."""
    if name_or_path in seen or len(seen) > 8:
        return NoShape(f"the chain of recipes writing {seen[0]} loops back on itself ({' -> '.join(seen)}); {_HOW}")
    chain = (*seen, name_or_path)
    if name_or_path.startswith(TINY_PREFIX):
        return tiny_shape()
    folder = Path(name_or_path).expanduser()
    try:
        if (folder / "config.json").is_file():
            return shape_from_config(_read_json(folder / "config.json"), str(folder / "config.json"))
        if (folder / "adapter_config.json").is_file():
            base = _read_json(folder / "adapter_config.json").get("base_model_name_or_path")
            if not isinstance(base, str) or not base:
                return NoShape(f"{folder / 'adapter_config.json'} names no base model; {_HOW}")
            return _noted(find_shape(base, writers, seen=chain), f"the LoRA adapter {folder} on it")
    except ConfigError as exc:
        return NoShape(f"{exc}; {_HOW}")
    location = folder.resolve()
    if location in writers:
        start, recipe = writers[location]
        return _noted(find_shape(start, writers, seen=chain), f"{name_or_path}, written by {recipe} from {start}")
    if name_or_path in KNOWN_SHAPES:
        return replace(KNOWN_SHAPES[name_or_path], source=f"{name_or_path} in the built-in table")
    if folder.exists():
        return NoShape(f"model folder {folder} has no config.json; {_HOW}")
    return NoShape(
        f"no config.json for '{name_or_path}' here (a hub id outside the built-in table, or a folder no recipe "
        f"alongside writes); {_HOW}"
    )


def _noted(shape: Shape, via: str) -> Shape:
    if isinstance(shape, NoShape):
        return shape
    return replace(shape, source=f"{shape.source}, via {via}")
