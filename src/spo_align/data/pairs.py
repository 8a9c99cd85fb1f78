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
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from spo_align.data.messages import (
    Message,
    RowFormatError,
    as_messages,
    content_text,
    describe,
    is_message_list,
)
from spo_align.data.policies import RowCounts, apply_pair_policy, left_nothing
from spo_align.data.sources import ROW_COLUMN, data_columns, load_source, sample_source
from spo_align.recipe.schema import DataSection, DatasetSource

if TYPE_CHECKING:
    import datasets

logger = logging.getLogger(__name__)

_PAIR_FORMATS = ("auto", "ultrafeedback", "pairs")


class PairFormatError(RowFormatError):
    """A preference row does not have the shape its dataset's format promises."""


def _where(source: DatasetSource, row: int | None = None) -> str:
    at = f"dataset {source.path!r} (split {source.split!r})"
    return at if row is None else f"{at}, row {row}"


def _split_answer(value: Any, field: str, where: str) -> tuple[list[Message] | None, str]:
    """(context messages or None, answer text) from a string or a message list ending with the assistant."""
    if isinstance(value, str):
        return None, value
    if is_message_list(value):
        messages = as_messages(value, where, field)
        if messages[-1]["role"] != "assistant":
            raise PairFormatError(f"{where}: {field!r} is a message list that does not end with an assistant message")
        return messages[:-1], messages[-1]["content"]
    if isinstance(value, list) and value and all(isinstance(m, dict) and "type" in m for m in value):
        return None, content_text(value, where, field)  # an answer given as a list of text parts
    raise PairFormatError(f"{where}: {field!r} is {describe(value)}, expected text or a message list")


def _prompt_messages(value: Any, where: str) -> list[Message]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if isinstance(value, list) and not value:
        return [{"role": "user", "content": ""}]  # an empty prompt: the row policy counts it
    if is_message_list(value):
        return as_messages(value, where, "prompt")
    raise PairFormatError(f"{where}: 'prompt' is {describe(value)}, expected text or a message list")


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
            messages = _prompt_messages(prompt, where)
            if messages != context[-len(messages):]:
                raise PairFormatError(f"{where}: the prompt messages do not match the chosen/rejected conversation")
            messages = context
    else:
        if prompt is None:
            raise PairFormatError(f"{where}: no prompt: the answers are plain text and the prompt is null")
        messages = _prompt_messages(prompt, where)
    if messages[-1]["role"] == "assistant":
        raise PairFormatError(f"{where}: the prompt must end with a user (or system) turn")
    return {"prompt": messages, "chosen": chosen_text, "rejected": rejected_text}


def to_canonical_pairs(ds: datasets.Dataset, source: DatasetSource) -> datasets.Dataset:
    """Convert one loaded source to the canonical pair columns (plus the row-origin column when present)."""
    if source.format not in _PAIR_FORMATS:
        raise PairFormatError(
            f"{_where(source)}: format {source.format!r} is not a preference-pair format (use one of {_PAIR_FORMATS})"
        )
    cols = source.columns
    present = data_columns(ds)
    for field, column in {"chosen": cols.chosen, "rejected": cols.rejected}.items():
        if column not in present:
            raise PairFormatError(
                f"{_where(source)}: missing column {column!r} (data.train[].columns.{field}); columns present: {present}"
            )
    has_prompt = cols.prompt in present
    if not has_prompt and len(ds) > 0 and not is_message_list(ds[0][cols.chosen]):
        raise PairFormatError(
            f"{_where(source)}: missing column {cols.prompt!r} (data.train[].columns.prompt); columns present: {present}"
        )
    has_rows = ROW_COLUMN in ds.column_names

    def convert(batch: dict[str, list[Any]], indices: list[int]) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {"prompt": [], "chosen": [], "rejected": []}
        prompts = batch[cols.prompt] if has_prompt else [None] * len(indices)
        wheres = batch[ROW_COLUMN] if has_rows else [_where(source, i) for i in indices]
        for where, prompt, chosen, rejected in zip(wheres, prompts, batch[cols.chosen], batch[cols.rejected]):
            row = convert_pair_row(prompt, chosen, rejected, where)
            for key, values in out.items():
                values.append(row[key])
        if has_rows:
            out[ROW_COLUMN] = wheres
        return out

    return ds.map(
        convert,
        batched=True,
        with_indices=True,
        remove_columns=ds.column_names,
        desc=f"pairs from {source.path}",
    )


def pair_columns(source: DatasetSource, ds: datasets.Dataset) -> list[str]:
    """The column-map fields a paired source needs: a prompt column unless the answers are whole conversations
    (ultrafeedback-style message lists)."""
    chosen = source.columns.chosen
    conversations = chosen in ds.column_names and len(ds) > 0 and is_message_list(ds[0][chosen])
    return ["chosen", "rejected"] if conversations else ["prompt", "chosen", "rejected"]


def source_name(source: DatasetSource) -> str:
    """How a source is named in logs and in run.json's row-policy counts."""
    return f"{source.path} [{source.split}]"


def load_canonical_pairs(
    source: DatasetSource,
    base_dir: Path | None = None,
    *,
    shuffle: bool = False,
    seed: int = 0,
    check_columns: Callable[[int, datasets.Dataset], None] | None = None,
    index: int = 0,
) -> datasets.Dataset:
    """Load one source, shuffle and cap it, and convert it to canonical pairs (with the row-origin column).

    `check_columns(index, ds)` runs on the raw source first (the runner uses it to name the recipe line of a
    missing column; `index` is the source's place in the recipe's list).
    """
    ds = load_source(source, base_dir)
    if check_columns is not None:
        check_columns(index, ds)
    ds = sample_source(ds, source, shuffle=shuffle, seed=seed)
    return to_canonical_pairs(ds, source)


@dataclass(frozen=True)
class PreparedPairs:
    dataset: datasets.Dataset
    """``prompt_ids``/``chosen_ids``/``rejected_ids`` and ``pair_index`` (0..N-1, the training order)."""
    counts: dict[str, Any]
    """Row-policy counts: ``{"total": {...}, "by_source": {name: {...}}}``."""


def prepare_pairs(
    sources: Sequence[DatasetSource],
    data: DataSection,
    tokenizer: Any,
    *,
    base_dir: Path | None = None,
    seed: int = 0,
    shuffle: bool = True,
    check_columns: Callable[[int, datasets.Dataset], None] | None = None,
    require_rows: bool = True,
) -> PreparedPairs:
    """Per source: load, convert, tokenize and apply the row policy; then concatenate and add ``pair_index``.

    Raises `RowPolicyError` when no pair is left, unless `require_rows` is False (a caller that pools sources).
    """
    import datasets

    from spo_align.data.tokenize import tokenize_pairs

    parts = []
    total = RowCounts()
    by_source: dict[str, dict[str, int]] = {}
    for index, source in enumerate(sources):
        pairs = load_canonical_pairs(
            source, base_dir, shuffle=shuffle, seed=seed, check_columns=check_columns, index=index
        )
        tokenized = tokenize_pairs(pairs, tokenizer, num_proc=data.num_proc)
        kept, counts = apply_pair_policy(tokenized, data.policy, data.max_length, require_rows=False)
        by_source[source_name(source)] = counts.as_dict()
        total = total + counts
        if counts.rows_in and not counts.rows_kept:
            logger.warning("%s: the row policy kept none of its %d rows", source_name(source), counts.rows_in)
        parts.append(kept.select_columns(["prompt_ids", "chosen_ids", "rejected_ids"]))
    if require_rows and total.rows_in and not total.rows_kept:
        raise left_nothing(total, "pairs")
    merged = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    merged = merged.add_column("pair_index", list(range(len(merged))))
    logger.info("%d preference pairs kept from %d source(s)", len(merged), len(parts))
    return PreparedPairs(merged, {"total": total.as_dict(), "by_source": by_source})
