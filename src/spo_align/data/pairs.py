"""Preference datasets in any supported layout -> one canonical pair shape.

Canonical row: ``prompt`` is a list of ``{"role", "content"}`` messages (the conversation up to the
answer), ``chosen`` and ``rejected`` are the two assistant answers as plain strings.

Layouts understood (per source, through its `ColumnMap`):
- ultrafeedback_binarized as it really is: ``prompt`` a plain string, ``chosen``/``rejected`` full
  message lists that repeat the user turn and end with the assistant answer;
- plain string pairs: ``prompt``/``chosen``/``rejected`` all strings;
- message-list pairs: ``prompt`` a message list, ``chosen``/``rejected`` strings or message lists.

Each source is converted before the sources are concatenated, because column maps are per source.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from spo_align.data.sources import DataSourceError, load_source, sample_source
from spo_align.recipe.schema import DatasetSource

if TYPE_CHECKING:
    import datasets

logger = logging.getLogger(__name__)

Message = dict[str, str]
CANONICAL_COLUMNS = ("prompt", "chosen", "rejected")
_PAIR_FORMATS = ("auto", "ultrafeedback", "pairs")


class PairFormatError(DataSourceError):
    """A preference row does not have the shape its dataset's format promises."""


def _where(source: DatasetSource, row: int | None = None) -> str:
    at = f"dataset {source.path!r} (split {source.split!r})"
    return at if row is None else f"{at}, row {row}"


def _is_message_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value)


def _as_messages(value: Any, field: str, where: str) -> list[Message]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if _is_message_list(value):
        return [{"role": str(m["role"]), "content": str(m["content"] or "")} for m in value]
    raise PairFormatError(f"{where}: column for {field!r} holds {type(value).__name__}, expected a string or a message list")


def _split_answer(value: Any, field: str, where: str) -> tuple[list[Message] | None, str]:
    """(context messages or None, answer text) from a string or a message list ending with the assistant."""
    if isinstance(value, str):
        return None, value
    if _is_message_list(value):
        if not value or value[-1]["role"] != "assistant":
            raise PairFormatError(f"{where}: {field!r} is a message list that does not end with an assistant message")
        context = [{"role": str(m["role"]), "content": str(m["content"] or "")} for m in value[:-1]]
        return context, str(value[-1]["content"] or "")
    raise PairFormatError(f"{where}: {field!r} holds {type(value).__name__}, expected a string or a message list")


def convert_pair_row(prompt: Any, chosen: Any, rejected: Any, where: str) -> dict[str, Any]:
    """One row in any supported layout -> ``{"prompt": [messages], "chosen": str, "rejected": str}``.

    When the answers are message lists their leading turns are the conversation; they must agree with each
    other, and a prompt string must be the content of their last user turn (ultrafeedback repeats it there).
    """
    chosen_ctx, chosen_text = _split_answer(chosen, "chosen", where)
    rejected_ctx, rejected_text = _split_answer(rejected, "rejected", where)
    if chosen_ctx and rejected_ctx and chosen_ctx != rejected_ctx:
        raise PairFormatError(f"{where}: chosen and rejected message lists hold different conversations")
    context = chosen_ctx or rejected_ctx
    if context:
        if isinstance(prompt, str):
            last_user = next((m["content"] for m in reversed(context) if m["role"] == "user"), None)
            if last_user is None or last_user.strip() != prompt.strip():
                raise PairFormatError(
                    f"{where}: the prompt string is not the last user turn of the chosen/rejected conversation"
                )
            messages = context
        elif prompt is None:
            messages = context
        else:
            messages = _as_messages(prompt, "prompt", where)
            if messages != context[-len(messages):]:
                raise PairFormatError(f"{where}: the prompt messages do not match the chosen/rejected conversation")
            messages = context
    else:
        if prompt is None:
            raise PairFormatError(f"{where}: no prompt: answers are plain strings and the prompt is empty")
        messages = _as_messages(prompt, "prompt", where)
    if not messages or messages[-1]["role"] == "assistant":
        raise PairFormatError(f"{where}: the prompt must end with a user (or system) turn")
    return {"prompt": messages, "chosen": chosen_text, "rejected": rejected_text}


def to_canonical_pairs(ds: datasets.Dataset, source: DatasetSource) -> datasets.Dataset:
    """Convert one loaded source to the canonical pair columns (and only those)."""
    if source.format not in _PAIR_FORMATS:
        raise PairFormatError(
            f"{_where(source)}: format {source.format!r} is not a preference-pair format (use one of {_PAIR_FORMATS})"
        )
    cols = source.columns
    wanted = {"chosen": cols.chosen, "rejected": cols.rejected}
    for field, column in wanted.items():
        if column not in ds.column_names:
            raise PairFormatError(
                f"{_where(source)}: missing column {column!r} (data.train[].columns.{field}); "
                f"columns present: {ds.column_names}"
            )
    has_prompt = cols.prompt in ds.column_names
    if not has_prompt and len(ds) > 0 and not _is_message_list(ds[0][cols.chosen]):
        raise PairFormatError(
            f"{_where(source)}: missing column {cols.prompt!r} (data.train[].columns.prompt); "
            f"columns present: {ds.column_names}"
        )

    def convert(batch: dict[str, list[Any]], indices: list[int]) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {"prompt": [], "chosen": [], "rejected": []}
        prompts = batch[cols.prompt] if has_prompt else [None] * len(indices)
        for i, prompt, chosen, rejected in zip(indices, prompts, batch[cols.chosen], batch[cols.rejected]):
            row = convert_pair_row(prompt, chosen, rejected, _where(source, i))
            for key, values in out.items():
                values.append(row[key])
        return out

    return ds.map(
        convert,
        batched=True,
        with_indices=True,
        remove_columns=ds.column_names,
        desc=f"pairs from {source.path}",
    )


def load_pair_dataset(
    sources: Sequence[DatasetSource],
    base_dir: Path | None = None,
    *,
    shuffle: bool = False,
    seed: int = 0,
    check_columns: Callable[[int, datasets.Dataset], None] | None = None,
) -> datasets.Dataset:
    """Load each source, shuffle and cap it, convert it to canonical pairs, then concatenate.

    `check_columns(index, ds)` runs on each raw source first (the runner uses it to name the recipe line
    of a missing column).
    """
    import datasets

    parts = []
    for index, source in enumerate(sources):
        ds = load_source(source, base_dir)
        if check_columns is not None:
            check_columns(index, ds)
        ds = sample_source(ds, source, shuffle=shuffle, seed=seed)
        parts.append(to_canonical_pairs(ds, source))
    merged = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    logger.info("%d preference pairs from %d source(s)", len(merged), len(parts))
    return merged
