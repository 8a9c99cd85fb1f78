"""SFT data: conversations -> token rows with the assistant mask, the row policy, optional packing.

Conversations are tokenized here, not by TRL, so that the assistant mask works with any chat template
(`spo_align.data.conversations`). With packing, conversations are packed into rows of `pack_length` tokens by
the project's best-fit-decreasing packer (`data.packing.best_fit_decreasing`, the one the preference stage packs
pairs with), each row carrying its `labels` and `seq_lengths`, from which TRL's padding-free collator restarts
`position_ids` at every conversation, so packed conversations never attend to each other.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from spo_align.data.conversations import ChatTemplateError, tokenize_conversation
from spo_align.data.errors import DataSourceError
from spo_align.data.messages import as_messages
from spo_align.data.pairs import source_name
from spo_align.data.policies import RowCounts, left_nothing, screen
from spo_align.data.sources import ROW_COLUMN, load_source, sample_source
from spo_align.data.tokenize import TemplateRefusedError, check_roles, template_roles

if TYPE_CHECKING:
    import datasets

    from spo_align.recipe.resolve import RunPlan

logger = logging.getLogger(__name__)


class SFTRowError(DataSourceError):
    """A source cannot be read as conversations, or its rows broke a rule whose policy is `raise`."""


def sequence_limit(plan: RunPlan) -> int:
    """Longest conversation kept whole: max_length, or the pack length when packing into shorter rows."""
    data = plan.recipe.data
    if data.packing:
        return min(data.max_length, plan.pack_length or data.max_length)
    return data.max_length


def pack_conversations(ds: datasets.Dataset, pack_length: int, *, shuffle: bool, seed: int) -> datasets.Dataset:
    """Tokenized conversations -> rows of at most `pack_length` tokens (best-fit decreasing).

    Each row holds `input_ids`, `labels` (-100 outside assistant tokens) and `seq_lengths`, the lengths of the
    conversations in it, from which the collator restarts `position_ids` at every conversation. Rows come out
    of the packer fullest first; they are shuffled (seeded) so batches do not go from full to sparse rows.
    """
    import datasets

    from spo_align.data.packing import best_fit_decreasing

    all_ids, all_masks = ds["input_ids"], ds["assistant_masks"]
    bins = best_fit_decreasing([len(ids) for ids in all_ids], pack_length)
    rows: dict[str, list[list[int]]] = {"input_ids": [], "labels": [], "seq_lengths": []}
    for members in bins:
        input_ids: list[int] = []
        labels: list[int] = []
        for k in members:
            input_ids += all_ids[k]
            labels += [t if m else -100 for t, m in zip(all_ids[k], all_masks[k])]
        rows["input_ids"].append(input_ids)
        rows["labels"].append(labels)
        rows["seq_lengths"].append([len(all_ids[k]) for k in members])
    packed = datasets.Dataset.from_dict(rows)
    return packed.shuffle(seed=seed) if shuffle else packed


def _tokenize_row(tokenizer: Any, value: Any, where: str, roles: frozenset[str]) -> dict[str, Any]:
    messages = as_messages(value, where, "messages")
    check_roles(messages, roles, where, "messages")
    try:
        conversation = tokenize_conversation(tokenizer, messages)
    except TemplateRefusedError as exc:
        raise TemplateRefusedError(f"{where}: {exc}") from None
    except ChatTemplateError:
        if not getattr(tokenizer, "is_fast", False):
            raise
        return {"input_ids": [], "assistant_masks": [], "boundary": "mismatch", "prompt_blank": False, "empty": False}
    answered = [k for k, m in enumerate(messages) if m["role"] == "assistant" and m["content"].strip()]
    before_last_answer = messages[: answered[-1]] if answered else []
    prompt_blank = any(m["role"] == "user" and not m["content"].strip() for m in before_last_answer)
    return {
        "input_ids": conversation.input_ids,
        "assistant_masks": conversation.assistant_masks,
        "boundary": conversation.boundary,
        "prompt_blank": prompt_blank,
        "empty": not answered or not any(conversation.assistant_masks),
    }


def tokenize_sft_dataset(
    plan: RunPlan, ds: datasets.Dataset, tokenizer: Any, column: str, name: str
) -> tuple[datasets.Dataset, RowCounts]:
    """Tokenize, then apply the row policy (empty prompt or answer, token boundary, too long)."""
    data = plan.recipe.data
    policy = data.policy
    limit = sequence_limit(plan)
    has_rows = ROW_COLUMN in ds.column_names
    roles = template_roles(tokenizer)

    def tokenize(batch: dict[str, list[Any]], indices: list[int]) -> dict[str, list[Any]]:
        wheres = batch[ROW_COLUMN] if has_rows else [f"{name}, row {i}" for i in indices]
        rows = [_tokenize_row(tokenizer, value, where, roles) for where, value in zip(wheres, batch[column])]
        out = {key: [row[key] for row in rows] for key in ("input_ids", "assistant_masks", "boundary", "prompt_blank", "empty")}
        out["where"] = wheres
        return out

    tokenized = ds.map(
        tokenize,
        batched=True,
        with_indices=True,
        remove_columns=ds.column_names,
        num_proc=data.num_proc,
        desc=f"tokenizing {name}",
    )
    counts = RowCounts(rows_in=len(tokenized))
    keep: list[int] = []
    truncate: dict[int, int] = {}
    columns = ("input_ids", "assistant_masks", "boundary", "prompt_blank", "empty", "where")
    for i, (ids, mask, boundary, prompt_blank, empty, where) in enumerate(zip(*(tokenized[c] for c in columns))):
        if not screen(policy, counts, where, prompt_blank=prompt_blank, answer_blank=empty, boundary=boundary):
            continue
        if len(ids) > limit:
            if policy.too_long == "raise":
                raise SFTRowError(
                    f"{where}: too long ({len(ids)} tokens > {limit}: data.max_length, or data.pack_length when "
                    "smaller); data.policy.too_long is 'raise'"
                )
            if policy.too_long == "drop" or not any(mask[:limit]):
                counts.too_long_dropped += 1
                continue
            truncate[len(keep)] = limit  # index in the kept rows
            counts.too_long_truncated += 1
        keep.append(i)
    kept = tokenized.select(keep)
    if truncate:

        def apply_cut(row: dict[str, Any], index: int) -> dict[str, Any]:
            n = truncate.get(index)
            if n is None:
                return row
            return {"input_ids": row["input_ids"][:n], "assistant_masks": row["assistant_masks"][:n]}

        kept = kept.map(apply_cut, with_indices=True, desc="truncating")
    kept = kept.select_columns(["input_ids", "assistant_masks"])
    counts.rows_kept = len(kept)
    return kept, counts


def load_sft_dataset(plan: RunPlan, tokenizer: Any, split: str) -> tuple[datasets.Dataset | None, dict[str, Any]]:
    """All sources of one split, columns checked, tokenized, policy applied, concatenated (None if no sources).

    The second value is the split's row-policy report: ``{"total": {...}, "by_source": {...}}`` plus
    ``"packed"`` when packing.
    """
    import datasets

    from spo_align.data.columns import require_columns

    data = plan.recipe.data
    sources = data.train if split == "train" else data.eval
    if not sources:
        return None, {}
    parts = []
    total = RowCounts()
    by_source: dict[str, dict[str, int]] = {}
    for index, source in enumerate(sources):
        if source.format not in ("auto", "messages"):
            raise SFTRowError(
                f"data.{split}[{index}].format is {source.format!r}; the sft stage reads conversations (messages)"
            )
        ds = load_source(source, plan.base_dir)
        require_columns(plan, split, index, ds, ["messages"])  # type: ignore[arg-type]
        ds = sample_source(ds, source, shuffle=split == "train" and data.shuffle, seed=plan.recipe.training.seed)
        name = source_name(source)
        tokenized, row_counts = tokenize_sft_dataset(plan, ds, tokenizer, source.columns.messages, name)
        by_source[name] = row_counts.as_dict()
        total = total + row_counts
        logger.info("%s: %s", name, row_counts.as_dict())
        parts.append(tokenized)
    report: dict[str, Any] = {"total": total.as_dict(), "by_source": by_source}
    merged = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    if len(merged) == 0:
        raise left_nothing(total, f"conversations in data.{split}")
    if data.packing:
        conversations = len(merged)
        merged = pack_conversations(
            merged, plan.pack_length or data.max_length, shuffle=data.shuffle and split == "train", seed=plan.recipe.training.seed
        )
        report["packed"] = {"conversations": conversations, "rows": len(merged)}
        logger.info("data.%s: packed %d conversations into %d rows", split, conversations, len(merged))
    return merged, report
