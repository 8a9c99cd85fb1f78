"""Tokenize canonical pairs through the model's chat template.

The prompt ids are the template applied to the prompt messages with ``add_generation_prompt=True``; the
completion ids of an answer are whatever the template adds after them for the whole conversation (the
answer text plus the template's end-of-turn tokens). Templates are checked to be prefix-consistent: the
ids of the full conversation must start with the prompt ids, otherwise the log-probs would be taken over
tokens the model never sees in that order, and the row is refused with an error.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import datasets

logger = logging.getLogger(__name__)

TOKENIZED_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")


class TemplateError(ValueError):
    """The chat template does not render the prompt as a prefix of the full conversation."""


@dataclass(frozen=True)
class TokenizedPair:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]


def _ids(tokenizer: Any, messages: list[dict[str, str]], *, add_generation_prompt: bool) -> list[int]:
    ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=False
    )
    return [int(i) for i in ids]


def completion_ids(tokenizer: Any, prompt: list[dict[str, str]], prompt_ids: list[int], answer: str) -> list[int]:
    """Ids the template adds after `prompt_ids` when `answer` is the assistant's turn."""
    full = _ids(tokenizer, [*prompt, {"role": "assistant", "content": answer}], add_generation_prompt=False)
    if full[: len(prompt_ids)] != prompt_ids:
        raise TemplateError(
            "the chat template is not prefix-consistent: rendering the prompt with add_generation_prompt=True "
            "does not give the start of the rendered conversation (first prompt message: "
            f"{prompt[0]['content'][:60]!r})"
        )
    return full[len(prompt_ids):]


def tokenize_pair(tokenizer: Any, prompt: list[dict[str, str]], chosen: str, rejected: str) -> TokenizedPair:
    prompt_ids = _ids(tokenizer, prompt, add_generation_prompt=True)
    return TokenizedPair(
        prompt_ids=prompt_ids,
        chosen_ids=completion_ids(tokenizer, prompt, prompt_ids, chosen),
        rejected_ids=completion_ids(tokenizer, prompt, prompt_ids, rejected),
    )


def tokenize_pairs(ds: datasets.Dataset, tokenizer: Any, *, num_proc: int | None = None) -> datasets.Dataset:
    """Add ``prompt_ids``/``chosen_ids``/``rejected_ids``; the text columns are kept for the row policies."""

    def run(batch: dict[str, list[Any]]) -> dict[str, list[list[int]]]:
        out: dict[str, list[list[int]]] = {c: [] for c in TOKENIZED_COLUMNS}
        for prompt, chosen, rejected in zip(batch["prompt"], batch["chosen"], batch["rejected"]):
            pair = tokenize_pair(tokenizer, prompt, chosen, rejected)
            out["prompt_ids"].append(pair.prompt_ids)
            out["chosen_ids"].append(pair.chosen_ids)
            out["rejected_ids"].append(pair.rejected_ids)
        return out

    return ds.map(run, batched=True, num_proc=num_proc, desc="tokenizing pairs")
