"""Chat messages as datasets hold them -> plain ``{"role": str, "content": str}`` messages, or a located error.

A message's ``content`` may be a string, or a list of parts in the OpenAI / Hugging Face multimodal convention
(``[{"type": "text", "text": "..."}]``): text parts are joined in order with nothing between them, as chat
templates that accept parts render them. A part that is not text (an image, audio), a null content, or a
value of another type is refused with the row and the field it was found in: training on its Python repr
would teach the model garbage.
"""

from __future__ import annotations

from typing import Any

from spo_align.data.errors import DataSourceError

Message = dict[str, str]


class RowFormatError(DataSourceError):
    """A dataset row does not have the shape its layout promises (named with its file/row and field)."""


def describe(value: Any) -> str:
    """A short description of a value for an error message: its JSON-ish type and a clipped repr."""
    kinds = {bool: "a boolean", int: "a number", float: "a number", str: "text", list: "a list", dict: "an object"}
    kind = "null" if value is None else kinds.get(type(value), type(value).__name__)
    if value is None:
        return kind
    shown = repr(value)
    return f"{kind} ({shown[:40] + '...' if len(shown) > 40 else shown})"


def content_text(value: Any, where: str, field: str) -> str:
    """The text of a message content: a string as it is, a list of text parts joined."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        texts: list[str] = []
        for k, part in enumerate(value):
            if not isinstance(part, dict):
                raise RowFormatError(f"{where}: {field}[{k}] is {describe(part)}, expected a part {{type, text}}")
            kind = part.get("type", "text")
            if kind != "text":
                raise RowFormatError(
                    f"{where}: {field}[{k}] is a {kind!r} part; only text parts can be trained on"
                )
            text = part.get("text")
            if not isinstance(text, str):
                raise RowFormatError(f"{where}: {field}[{k}].text is {describe(text)}, expected text")
            texts.append(text)
        return "".join(texts)
    raise RowFormatError(f"{where}: {field} is {describe(value)}, expected text or a list of text parts")


def is_message_list(value: Any) -> bool:
    """True for a non-empty list of mappings that each have a role and a content key."""
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(m, dict) and "role" in m and "content" in m for m in value)
    )


def as_messages(value: Any, where: str, field: str) -> list[Message]:
    """A message list with text contents; refuses anything that is not one."""
    if not is_message_list(value):
        raise RowFormatError(f"{where}: {field} is {describe(value)}, expected a list of {{role, content}} messages")
    out: list[Message] = []
    for k, message in enumerate(value):
        role = message["role"]
        if not isinstance(role, str) or not role.strip():
            raise RowFormatError(f"{where}: {field}[{k}].role is {describe(role)}, expected a role name")
        out.append({"role": role, "content": content_text(message["content"], where, f"{field}[{k}].content")})
    return out


def prompt_is_blank(prompt: list[Message]) -> bool:
    """True when the turn the answer replies to (the prompt's last) has no text."""
    return not prompt or not prompt[-1]["content"].strip()
