"""SFT conversations -> token ids and the assistant mask, with any chat template.

The mask comes from incremental renders, so it works with templates that have no ``{% generation %}`` markers:
rendering the first k messages must give a prefix of the whole rendering (checked), so assistant turn k spans
the characters between the render of ``messages[:k]`` with the generation prompt and the render of
``messages[:k+1]``. That span holds what the template emits for the turn after its header, including the
end-of-turn token, so the model learns to stop.

Token boundaries follow the rule of `spo_align.data.tokenize`: the conversation is tokenized whole (``joint``)
when every span starts and ends on a token boundary, and the tokens starting inside a span are trained on.
When a token straddles a span's edge (whitespace merged across the boundary), the text is cut at every span
edge and each piece tokenized on its own (``split``): each assistant turn is then tokenized as the model
generates it after its prompt, and exactly its characters are trained on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from spo_align.data.tokenize import Boundary, TemplateError, encode, render

Message = dict[str, str]


class ChatTemplateError(TemplateError):
    """The chat template cannot be used to find the assistant tokens of a conversation."""


def assistant_char_spans(tokenizer: Any, messages: list[Message]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns (end-of-turn included)."""
    full = render(tokenizer, messages, add_generation_prompt=False)
    spans: list[tuple[int, int]] = []
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(tokenizer, messages[:k], add_generation_prompt=True) if k else ""
        through = render(tokenizer, messages[: k + 1], add_generation_prompt=False)
        if not (full.startswith(before) and full.startswith(through) and through.startswith(before)):
            raise ChatTemplateError(
                "the chat template is not prefix-consistent: rendering the first "
                f"{k + 1} messages does not give the start of the whole conversation, so the assistant tokens "
                "cannot be located (set model.chat_template to a template that renders turns incrementally)"
            )
        if len(through) > len(before):
            spans.append((len(before), len(through)))
    return full, spans


@dataclass(frozen=True)
class TokenizedConversation:
    input_ids: list[int]
    assistant_masks: list[int]
    boundary: Boundary


def _straddles(offsets: list[tuple[int, int]], edges: set[int]) -> bool:
    return any(start < edge < end for start, end in offsets for edge in edges)


def tokenize_conversation(tokenizer: Any, messages: list[Message]) -> TokenizedConversation:
    """`input_ids` of the rendered conversation, its `assistant_masks` (1 on assistant tokens) and how it was cut."""
    if not getattr(tokenizer, "is_fast", False):
        raise ChatTemplateError("assistant masks need a fast tokenizer (character offsets)")
    text, spans = assistant_char_spans(tokenizer, messages)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = [(int(s), int(e)) for s, e in encoded["offset_mapping"]]
    edges = {edge for span in spans for edge in span} - {0, len(text)}
    if not _straddles(offsets, edges):
        ids = [int(i) for i in encoded["input_ids"]]
        mask = [int(end > start and any(s <= start < e for s, e in spans)) for start, end in offsets]
        return TokenizedConversation(ids, mask, "joint")
    ids: list[int] = []
    mask: list[int] = []
    cuts = sorted({0, len(text), *edges})
    for start, stop in zip(cuts, cuts[1:]):
        piece = encode(tokenizer, text[start:stop])
        inside = any(s <= start < e for s, e in spans)
        ids += piece
        mask += [int(inside)] * len(piece)
    return TokenizedConversation(ids, mask, "split")
