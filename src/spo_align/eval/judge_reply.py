"""Reading the body of a chat-completion reply without trusting it.

The judge client reads at most `MAX_REPLY_BYTES` of a reply; `read_completion` turns those bytes
into the reply text and token counts, or raises `UnreadableReply` saying what is wrong: a body
larger than the limit, bytes that are not UTF-8, not JSON (an HTML error page sent with status
200, say), an error object, no choices, no message, or content that is null or not a string (a
list of content parts is refused rather than guessed at). Token counts that are not
non-negative integers are dropped, not trusted.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

MAX_REPLY_BYTES = 1 << 20  # 1 MiB: far above any judge reply; a larger body is not read further


class UnreadableReply(ValueError):
    """A reply that is not a chat completion with text content. `body` is its text, for the record."""

    def __init__(self, reason: str, body: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.body = body


@dataclass(frozen=True)
class Completion:
    text: str
    prompt_tokens: int | None
    completion_tokens: int | None


def _kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return {str: "string", list: "list", dict: "object"}.get(type(value), type(value).__name__)


def _count(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def read_completion(body: bytes, content_type: str, complete: bool = True) -> Completion:
    """The text and token counts of a chat-completion body; `complete=False` when it was cut at the limit."""
    text = body.decode("utf-8", "replace")
    if not complete:
        raise UnreadableReply(f"the reply is larger than {MAX_REPLY_BYTES} bytes", text)
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UnreadableReply(f"the reply is not UTF-8 text (byte {body[exc.start]:#04x} at offset {exc.start})", text) from None
    try:
        data: Any = json.loads(text.removeprefix("\ufeff"))
    except ValueError:
        raise UnreadableReply(f"the reply is not JSON (content-type {content_type or 'not given'})", text) from None
    if not isinstance(data, dict):
        raise UnreadableReply(f"the reply is a JSON {_kind(data)}, not an object", text)
    if "choices" not in data and "error" in data:
        error = data["error"]
        message = error.get("message") if isinstance(error, dict) else error
        raise UnreadableReply(f"the server answered with an error: {message}", text)
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices:
        raise UnreadableReply("the reply has no choices", text)
    message = choices[0].get("message") if isinstance(choices[0], dict) else None
    if not isinstance(message, dict):
        raise UnreadableReply("the reply's first choice has no message", text)
    content = message.get("content")
    if content is None:
        refusal = message.get("refusal")
        raise UnreadableReply("the reply has no content" + (f" (refusal: {refusal})" if refusal else ""), text)
    if not isinstance(content, str):
        raise UnreadableReply(f"the reply's content is a {_kind(content)}, not text", text)
    usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
    return Completion(content, _count(usage.get("prompt_tokens")), _count(usage.get("completion_tokens")))
