"""The bench's workload: synthetic preference pairs with long-tailed lengths, a word-level tokenizer
over a synthetic vocabulary, and a random-weight Llama-architecture model built from config.

Every engine under test (TRL's DPOTrainer and `spo train`) reads the same JSONL file of conversational
pairs and the same `save_pretrained` folder, and tokenizes them through the same chat template, so the
token sequences they train on are identical. One word of text is one token: the token counts below are
exact, not estimates.
"""

from __future__ import annotations

import json
import logging
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

PAD = "<pad>"
BOS = "<s>"
EOS = "</s>"
UNK = "<unk>"
USER = "<|user|>"
ASSISTANT = "<|assistant|>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK, USER, ASSISTANT)
TEMPLATE_PROMPT_TOKENS = 2
"""Tokens the chat template adds around a prompt: the user tag and the assistant tag (generation prompt)."""
TEMPLATE_ANSWER_TOKENS = 1
"""Tokens the chat template adds after an answer: EOS."""

# Prefix-consistent by construction: the prompt rendered with add_generation_prompt=True is the start of
# the rendered conversation, so TRL's and spo's tokenization agree token for token.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '<|user|> ' + message['content'] + ' ' }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|assistant|> ' + message['content'] + ' </s> ' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|> ' }}{% endif %}"
)


@dataclass(frozen=True)
class LengthModel:
    """Log-normal word counts, like UltraFeedback's: prompts of tens of tokens, answers from a few to ~1000."""

    prompt_median: float = 60.0
    prompt_sigma: float = 0.8
    response_median: float = 180.0
    response_sigma: float = 0.75
    min_prompt: int = 4
    min_response: int = 2
    max_length: int = 1024
    """Cap on prompt + answer including template tokens; answers are cut so no engine has to truncate."""


@dataclass(frozen=True)
class ModelShape:
    """A Llama-architecture model, large enough that matrix work dominates the step on CPU."""

    vocab_size: int = 8192
    hidden_size: int = 256
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    intermediate_size: int = 688
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = True
    architecture: str = "llama"
    """llama (LlamaForCausalLM) or qwen2 (Qwen2ForCausalLM: biases on q/k/v)."""


QWEN25_1P5B = ModelShape(
    vocab_size=151_936,
    hidden_size=1536,
    num_hidden_layers=28,
    num_attention_heads=12,
    num_key_value_heads=2,
    intermediate_size=8960,
    max_position_embeddings=32_768,
    tie_word_embeddings=True,
    architecture="qwen2",
)
"""Qwen2.5-1.5B's shape (1.54B parameters), for the GPU check; weights are random."""


@dataclass(frozen=True)
class PairLengths:
    prompt: int
    chosen: int
    rejected: int


def sample_lengths(n: int, lengths: LengthModel, seed: int) -> list[PairLengths]:
    """Word counts of `n` pairs; each prompt + answer (with template tokens) fits `lengths.max_length`."""
    rng = random.Random(seed)
    budget = lengths.max_length - TEMPLATE_PROMPT_TOKENS - TEMPLATE_ANSWER_TOKENS
    out: list[PairLengths] = []
    for _ in range(n):
        prompt = max(lengths.min_prompt, round(rng.lognormvariate(math.log(lengths.prompt_median), lengths.prompt_sigma)))
        prompt = min(prompt, budget // 2)
        answers = []
        for _side in range(2):
            answer = round(rng.lognormvariate(math.log(lengths.response_median), lengths.response_sigma))
            answers.append(min(max(lengths.min_response, answer), budget - prompt))
        out.append(PairLengths(prompt=prompt, chosen=answers[0], rejected=answers[1]))
    return out


def words(vocab_size: int) -> list[str]:
    """The synthetic vocabulary's plain words (special tokens excluded)."""
    return [f"w{i}" for i in range(vocab_size - len(SPECIAL_TOKENS))]


def single_token_words(tokenizer: Any, limit: int = 4000) -> list[str]:
    """Plain lower-case words (3+ letters) that a real tokenizer encodes as one token after a space, in
    vocabulary order: text made of them has about as many tokens as words (the exact count is taken from
    the tokenizer, `real_pair_tokens`)."""
    out: list[str] = []
    for token_id in range(len(tokenizer)):
        text = tokenizer.decode([token_id])
        word = text[1:]
        if text.startswith(" ") and len(word) >= 3 and word.isascii() and word.isalpha() and word.islower():
            if len(tokenizer(" " + word, add_special_tokens=False)["input_ids"]) == 1:
                out.append(word)
                if len(out) >= limit:
                    break
    if len(out) < 100:
        raise ValueError(f"the tokenizer has only {len(out)} single-token words; the bench needs at least 100")
    return out


def real_pair_tokens(tokenizer: Any, rows: list[dict[str, Any]]) -> int:
    """Real tokens of one epoch over `rows` (prompt + chosen and prompt + rejected) through the model's own
    chat template, as `spo train` tokenizes them (TRL must see the same count: the report checks it)."""
    from spo_align.data.tokenize import tokenize_pair

    total = 0
    for row in rows:
        pair = tokenize_pair(tokenizer, row["prompt"], row["chosen"][0]["content"], row["rejected"][0]["content"])
        total += 2 * len(pair.prompt_ids) + len(pair.chosen_ids) + len(pair.rejected_ids)
    return total


def make_pairs(
    n: int, lengths: LengthModel, vocab_size: int, seed: int, vocab: list[str] | None = None
) -> list[dict[str, Any]]:
    """Conversational pairs: prompt = [user message], chosen/rejected = [assistant message]. Words are
    drawn from `vocab` (a real tokenizer's single-token words), else from the synthetic vocabulary."""
    rng = random.Random(seed + 1)
    vocab = words(vocab_size) if vocab is None else vocab

    def text(count: int) -> str:
        return " ".join(rng.choice(vocab) for _ in range(count))

    rows = []
    for pl in sample_lengths(n, lengths, seed):
        chosen, rejected = text(pl.chosen), text(pl.rejected)
        if chosen == rejected:  # vanishingly rare; keep the pair non-identical so no engine drops it
            rejected = text(pl.rejected)
        rows.append(
            {
                "prompt": [{"role": "user", "content": text(pl.prompt)}],
                "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}],
            }
        )
    return rows


def make_conversations(n: int, lengths: LengthModel, vocab_size: int, seed: int) -> list[dict[str, Any]]:
    """SFT rows: one user turn and one assistant turn each, with the same long-tailed lengths."""
    return [{"messages": row["prompt"] + row["chosen"]} for row in make_pairs(n, lengths, vocab_size, seed)]


def pair_token_counts(row: dict[str, Any]) -> tuple[int, int]:
    """Exact tokens of (prompt + chosen, prompt + rejected) as the chat template renders them."""
    prompt = len(row["prompt"][0]["content"].split()) + TEMPLATE_PROMPT_TOKENS
    chosen = len(row["chosen"][0]["content"].split()) + TEMPLATE_ANSWER_TOKENS
    rejected = len(row["rejected"][0]["content"].split()) + TEMPLATE_ANSWER_TOKENS
    return prompt + chosen, prompt + rejected


def conversation_tokens(row: dict[str, Any]) -> int:
    """Exact tokens of an SFT row (one user turn, one assistant turn) as the chat template renders it."""
    user, assistant = row["messages"]
    return len(user["content"].split()) + len(assistant["content"].split()) + TEMPLATE_PROMPT_TOKENS + TEMPLATE_ANSWER_TOKENS


def write_jsonl(rows: list[dict[str, Any]], path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    return path


def build_tokenizer(vocab_size: int):
    """A word-level `PreTrainedTokenizerFast` (one token per whitespace-separated word) with the chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for word in words(vocab_size):
        vocab[word] = len(vocab)
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.add_special_tokens(list(SPECIAL_TOKENS))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        additional_special_tokens=[USER, ASSISTANT],
        model_max_length=1 << 16,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_model(shape: ModelShape, tokenizer: Any, seed: int = 0, device: str = "cpu"):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    classes = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}
    config_cls, model_cls = classes[shape.architecture]
    config = config_cls(
        vocab_size=shape.vocab_size,
        hidden_size=shape.hidden_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        intermediate_size=shape.intermediate_size,
        max_position_embeddings=shape.max_position_embeddings,
        tie_word_embeddings=shape.tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    with torch.device(device):  # initialising 1.5B parameters is much faster on a GPU
        return model_cls(config)


def write_model(out_dir: Path, shape: ModelShape, seed: int = 0, device: str = "cpu", dtype: str = "float32") -> Path:
    """Tokenizer + random-weight model in one `from_pretrained` folder (kept if it already holds this shape)."""
    import torch

    out_dir = Path(out_dir)
    stamp = out_dir / "bench_shape.json"
    wanted = json.dumps({"shape": asdict(shape), "seed": seed, "dtype": dtype}, sort_keys=True)
    if stamp.exists() and stamp.read_text(encoding="utf-8") == wanted:
        return out_dir
    tokenizer = build_tokenizer(shape.vocab_size)
    model = build_model(shape, tokenizer, seed, device=device).to(getattr(torch, dtype))
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    stamp.write_text(wanted, encoding="utf-8")
    logger.info("wrote %.1fM-parameter bench model to %s", sum(p.numel() for p in model.parameters()) / 1e6, out_dir)
    del model
    if device == "cuda":  # the runs are other processes: hand the memory back to the device
        torch.cuda.empty_cache()
    return out_dir
