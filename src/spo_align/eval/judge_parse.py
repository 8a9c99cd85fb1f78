"""The versioned judge prompt and the strict reading of the judge's verdict.

A prompt file has two sections, `=== system ===` and `=== user ===`; the user section holds the
placeholders `{question}`, `{answer_a}` and `{answer_b}` (filled by plain replacement, so braces in
answers are harmless). Its version, part of every judgment's cache key, is the file's stem plus
a short hash of its text: editing the prompt never reuses judgments made with the old one.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Literal

Verdict = Literal["A", "B", "C"]

DEFAULT_PROMPT = "pairwise_v1"
_SECTION_RE = re.compile(r"^=== (system|user) ===[ \t]*$", re.MULTILINE)
_VERDICT_RE = re.compile(r"\[\[([A-Za-z]*)\]\]")
# After the final verdict only whitespace and Markdown emphasis/punctuation may follow.
_TRAILER_RE = re.compile(r"[\s*_.`]*")
PLACEHOLDERS = ("{question}", "{answer_a}", "{answer_b}")


class PromptTemplateError(ValueError):
    """A judge prompt file that does not have the expected shape."""


class VerdictParseError(ValueError):
    """A judge reply whose verdict cannot be read without guessing."""


@dataclass(frozen=True)
class JudgePrompt:
    name: str
    system: str
    user: str

    @property
    def version(self) -> str:
        digest = hashlib.sha256(f"{self.system}\n\x00\n{self.user}".encode()).hexdigest()
        return f"{self.name}@{digest[:10]}"

    def render(self, question: str, answer_a: str, answer_b: str) -> list[dict[str, str]]:
        """Chat messages for one comparison. Values are inserted in one pass, so an answer that
        contains the text `{answer_b}` is not itself substituted."""
        values = {"{question}": question, "{answer_a}": answer_a, "{answer_b}": answer_b}
        user = re.sub(r"\{question\}|\{answer_a\}|\{answer_b\}", lambda m: values[m.group(0)], self.user)
        messages = [{"role": "user", "content": user}]
        if self.system:
            messages.insert(0, {"role": "system", "content": self.system})
        return messages


def parse_prompt_text(name: str, text: str, where: str) -> JudgePrompt:
    text = text.replace("\r\n", "\n")
    parts = _SECTION_RE.split(text)
    # parts: [before, "system", body, "user", body] or [before, "user", body]
    if parts[0].strip():
        raise PromptTemplateError(f"{where}: text before the first '=== system ===' or '=== user ===' line")
    sections = dict(zip(parts[1::2], (body.strip("\n") for body in parts[2::2]), strict=True))
    if len(sections) != len(parts[1::2]) or "user" not in sections:
        raise PromptTemplateError(f"{where}: needs exactly one '=== user ===' section (and at most one system)")
    missing = [p for p in PLACEHOLDERS if p not in sections["user"]]
    if missing:
        raise PromptTemplateError(f"{where}: the user section lacks {', '.join(missing)}")
    return JudgePrompt(name=name, system=sections.get("system", "").strip(), user=sections["user"])


def load_judge_prompt(source: str | Path = DEFAULT_PROMPT) -> JudgePrompt:
    """A shipped prompt by name (`pairwise_v1`) or a prompt file by path."""
    path = Path(source)
    if path.suffix == ".txt" or path.is_file():
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise PromptTemplateError(f"{path}: cannot read judge prompt: {exc.strerror}") from None
        return parse_prompt_text(path.stem, text, str(path))
    shipped = resources.files("spo_align.eval").joinpath("prompts", f"{source}.txt")
    if not shipped.is_file():
        raise PromptTemplateError(f"no shipped judge prompt named {source!r} and no such file")
    return parse_prompt_text(str(source), shipped.read_text(encoding="utf-8"), f"prompts/{source}.txt")


def parse_verdict(reply: str) -> Verdict:
    """The verdict of a reply that ends with `[[A]]`, `[[B]]` or `[[C]]`.

    Strict: the last `[[...]]` must be one of the three and be followed only by whitespace or
    Markdown emphasis; any other verdict-like token in the reply (`[[B]]` earlier in a reply that
    ends with `[[A]]`, or `[[D]]`) makes the reply ambiguous. Nothing is guessed.
    """
    matches = list(_VERDICT_RE.finditer(reply))
    if not matches:
        raise VerdictParseError("no [[A]], [[B]] or [[C]] verdict in the reply")
    last = matches[-1]
    if last.group(1) not in ("A", "B", "C"):
        raise VerdictParseError(f"the final verdict [[{last.group(1)}]] is not A, B or C")
    if not _TRAILER_RE.fullmatch(reply, last.end()):
        raise VerdictParseError("the reply does not end with its verdict")
    others = {m.group(1) for m in matches[:-1]}
    if others - {last.group(1)}:
        raise VerdictParseError(f"conflicting verdicts in the reply: {sorted(others | {last.group(1)})}")
    verdict: Verdict = last.group(1)  # type: ignore[assignment]
    return verdict
