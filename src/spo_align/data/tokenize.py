"""Token ids of prompts and answers through the model's chat template, as the model sees them when it generates.

The prompt ids are the template applied to the prompt messages with ``add_generation_prompt=True``: exactly what
generation feeds the model. The answer ids are what the template adds after the prompt for the whole
conversation (the answer text plus the template's end-of-turn tokens):

- usually (``joint``) the ids of the rendered conversation past the prompt ids, the two tokenized together;
- when tokens merge across the prompt/answer boundary, the conversation's ids do not start with the prompt ids.
  Byte-level BPE tokenizers that merge whitespace runs do this (Qwen2.5's pre-tokenizer takes ``\\s*[\\r\\n]+`` as
  one piece) for any answer that starts with blank lines or spaces. The answer's text (the rendered
  conversation past the rendered prompt) is then tokenized on its own (``split``): prompt ids + answer ids spell
  exactly the rendered conversation, the prompt ids stay those of generation, and the scored tokens are the
  answer's and nothing else. The row is counted (``boundary_split``) and kept, unless ``data.policy.
  token_boundary`` says ``drop`` or ``raise``;
- a template whose rendered prompt is not even a prefix of the rendered conversation as text (``mismatch``)
  cannot be split anywhere meaningful: the row is dropped and counted, or refused under ``raise``.
SFT conversations use the same rule at every assistant turn (`spo_align.data.conversations`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import datasets

logger = logging.getLogger(__name__)

Message = dict[str, str]
Boundary = Literal["joint", "split", "mismatch"]
TOKENIZED_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")


class TemplateError(ValueError):
    """The chat template does not render the prompt as a prefix of the full conversation."""


class TemplateRefusedError(TemplateError):
    """The chat template raised on a conversation (Gemma's refuses a system turn): named with its row."""


class RoleError(TemplateError):
    """A message's role is not one the chat template renders as a turn (named with its row and field)."""


UNIVERSAL_ROLES = frozenset({"system", "user", "assistant"})
NAMED_ROLES = ("tool", "ipython", "function", "developer")
"""Roles a template renders only when it names them (a Qwen or Llama 3.1 template handles `tool` turns itself)."""
_SHAREGPT = {"human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant"}


def template_roles(tokenizer: Any) -> frozenset[str]:
    """The roles the tokenizer's chat template renders as turns: system, user and assistant, plus each of
    `NAMED_ROLES` that the template names as a quoted string. A role outside them would be rendered as its own
    text (`<|human|>`, `<|im_start|>human`), a turn the model has never seen: `check_roles` refuses it."""
    template = getattr(tokenizer, "chat_template", None)
    texts = list(template.values()) if isinstance(template, dict) else [template or ""]
    named = {role for role in NAMED_ROLES for text in texts if re.search(rf"""['"]{role}['"]""", str(text))}
    return UNIVERSAL_ROLES | named


def check_roles(messages: Sequence[Message], roles: frozenset[str], where: str, field: str) -> None:
    """Raise `RoleError` for the first message whose role is not in `roles`."""
    for k, message in enumerate(messages):
        role = message["role"]
        if role in roles:
            continue
        hint = ""
        if role.strip().lower() in roles:
            hint = f" (write {role.strip().lower()!r})"
        elif role.strip().lower() in _SHAREGPT:
            hint = " (ShareGPT's 'human' is 'user', 'gpt' is 'assistant')"
        raise RoleError(
            f"{where}: {field}[{k}].role is {role!r}, a turn the chat template does not render (it renders only "
            f"{', '.join(sorted(roles))}); rename the role{hint}"
        )


def render(tokenizer: Any, messages: list[Message], *, add_generation_prompt: bool) -> str:
    from jinja2.exceptions import TemplateError as JinjaError

    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except JinjaError as exc:
        raise TemplateRefusedError(f"the chat template refused this conversation: {exc}") from None
    if not isinstance(text, str):
        raise TemplateError("apply_chat_template(tokenize=False) did not return a string")
    return text


def encode(tokenizer: Any, text: str) -> list[int]:
    """Ids of text that already holds the template's special tokens (none are added)."""
    return [int(i) for i in tokenizer(text, add_special_tokens=False)["input_ids"]]


@dataclass(frozen=True)
class Answer:
    ids: list[int]
    boundary: Boundary


def answer_ids(tokenizer: Any, prompt: list[Message], prompt_text: str, prompt_ids: list[int], answer: str) -> Answer:
    """The ids the template adds after `prompt_ids` when `answer` is the assistant's turn (see the module doc)."""
    full_text = render(tokenizer, [*prompt, {"role": "assistant", "content": answer}], add_generation_prompt=False)
    full = encode(tokenizer, full_text)
    if full[: len(prompt_ids)] == prompt_ids:
        return Answer(full[len(prompt_ids) :], "joint")
    if not full_text.startswith(prompt_text):
        return Answer([], "mismatch")
    return Answer(encode(tokenizer, full_text[len(prompt_text) :]), "split")


@dataclass(frozen=True)
class PromptIds:
    text: str
    ids: list[int]


def prompt_ids(tokenizer: Any, prompt: list[Message]) -> PromptIds:
    text = render(tokenizer, prompt, add_generation_prompt=True)
    return PromptIds(text, encode(tokenizer, text))


def worst(*boundaries: Boundary) -> Boundary:
    """The boundary a row is counted under: mismatch over split over joint."""
    for kind in ("mismatch", "split"):
        if kind in boundaries:
            return kind  # type: ignore[return-value]
    return "joint"


@dataclass(frozen=True)
class TokenizedPair:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    boundary: Boundary = "joint"


def tokenize_pair(tokenizer: Any, prompt: list[Message], chosen: str, rejected: str) -> TokenizedPair:
    head = prompt_ids(tokenizer, prompt)
    good = answer_ids(tokenizer, prompt, head.text, head.ids, chosen)
    bad = answer_ids(tokenizer, prompt, head.text, head.ids, rejected)
    return TokenizedPair(head.ids, good.ids, bad.ids, worst(good.boundary, bad.boundary))


@contextmanager
def _at_row(where: str) -> Iterator[None]:
    """A template's refusal, named with the row it refused."""
    try:
        yield
    except TemplateRefusedError as exc:
        raise TemplateRefusedError(f"{where}: {exc}") from None


def _wheres(batch: dict[str, list[Any]], indices: list[int]) -> list[str]:
    from spo_align.data.sources import ROW_COLUMN

    return batch[ROW_COLUMN] if ROW_COLUMN in batch else [f"row {i}" for i in indices]


def tokenize_pairs(ds: datasets.Dataset, tokenizer: Any, *, num_proc: int | None = None) -> datasets.Dataset:
    """Add ``prompt_ids``/``chosen_ids``/``rejected_ids`` and ``boundary``; text columns stay for the row policy.
    Raises `RoleError` for a prompt turn whose role the template does not render."""
    roles = template_roles(tokenizer)

    def run(batch: dict[str, list[Any]], indices: list[int]) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {c: [] for c in (*TOKENIZED_COLUMNS, "boundary")}
        wheres = _wheres(batch, indices)
        for where, prompt, chosen, rejected in zip(wheres, batch["prompt"], batch["chosen"], batch["rejected"]):
            check_roles(prompt, roles, where, "prompt")
            with _at_row(where):
                pair = tokenize_pair(tokenizer, prompt, chosen, rejected)
            out["prompt_ids"].append(pair.prompt_ids)
            out["chosen_ids"].append(pair.chosen_ids)
            out["rejected_ids"].append(pair.rejected_ids)
            out["boundary"].append(pair.boundary)
        return out

    return ds.map(run, batched=True, with_indices=True, num_proc=num_proc, desc="tokenizing pairs")


def tokenize_completions(ds: datasets.Dataset, tokenizer: Any, *, num_proc: int | None = None) -> datasets.Dataset:
    """Unpaired rows (``prompt`` messages, ``completion`` text): add ``prompt_ids``/``completion_ids``/``boundary``.
    Raises `RoleError` for a prompt turn whose role the template does not render."""
    roles = template_roles(tokenizer)

    def run(batch: dict[str, list[Any]], indices: list[int]) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {"prompt_ids": [], "completion_ids": [], "boundary": []}
        for where, prompt, completion in zip(_wheres(batch, indices), batch["prompt"], batch["completion"]):
            check_roles(prompt, roles, where, "prompt")
            with _at_row(where):
                head = prompt_ids(tokenizer, prompt)
                answer = answer_ids(tokenizer, prompt, head.text, head.ids, completion)
            out["prompt_ids"].append(head.ids)
            out["completion_ids"].append(answer.ids)
            out["boundary"].append(answer.boundary)
        return out

    return ds.map(run, batched=True, with_indices=True, num_proc=num_proc, desc="tokenizing examples")
