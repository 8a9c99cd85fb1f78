"""The SFT stage: TRL's SFTTrainer on conversations, loss on assistant tokens only, optional packing.

Conversations are tokenized here, not by TRL, so that the assistant mask works with any chat template, also
templates without `{% generation %}` markers (TRL 1.16 only knows how to add them to a few model families).
The mask comes from incremental renders: rendering the first k messages of a conversation must give a prefix of
the whole rendering (checked), so the assistant turn k spans the characters between the render of messages[:k]
with the generation prompt and the render of messages[:k+1]; tokens starting inside such a span are trained on.
That span holds what the template emits for the turn after its header, including the end-of-turn token, so the
model learns to stop.

Without packing, TRL receives `input_ids` + `assistant_masks` and builds the labels itself. With packing, the
conversations are packed here into rows of `pack_length` tokens by the project's best-fit-decreasing packer
(`data.packing.best_fit_decreasing`, the one the preference stage packs pairs with), each row carrying its
`labels` and `seq_lengths`; TRL then skips its own preparation and its padding-free collator emits `position_ids`
that restart at each sequence, from which the model builds a block-diagonal causal mask (flash attention: varlen
kernels; sdpa/eager: a packed-sequence mask), so packed conversations never attend to each other.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from spo_align.data.sources import DataSourceError, load_source, sample_source

if TYPE_CHECKING:
    import datasets

    from spo_align.recipe.resolve import RunPlan
    from spo_align.train.context import RunContext

logger = logging.getLogger(__name__)

Message = dict[str, str]


class ChatTemplateError(ValueError):
    """The chat template cannot be used to find the assistant tokens of a conversation."""


class SFTRowError(DataSourceError):
    """A conversation broke a row rule whose policy is `raise`, or is malformed."""


def _render(tokenizer: Any, messages: list[Message], *, add_generation_prompt: bool) -> str:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    if not isinstance(text, str):
        raise ChatTemplateError("apply_chat_template(tokenize=False) did not return a string")
    return text


def assistant_char_spans(tokenizer: Any, messages: list[Message]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns (end-of-turn included)."""
    full = _render(tokenizer, messages, add_generation_prompt=False)
    spans: list[tuple[int, int]] = []
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:k], add_generation_prompt=True) if k else ""
        through = _render(tokenizer, messages[: k + 1], add_generation_prompt=False)
        if not (full.startswith(before) and full.startswith(through) and through.startswith(before)):
            raise ChatTemplateError(
                "the chat template is not prefix-consistent: rendering the first "
                f"{k + 1} messages does not give the start of the whole conversation, so the assistant tokens "
                "cannot be located (set model.chat_template to a template that renders turns incrementally)"
            )
        if len(through) > len(before):
            spans.append((len(before), len(through)))
    return full, spans


def tokenize_conversation(tokenizer: Any, messages: list[Message]) -> tuple[list[int], list[int]]:
    """`input_ids` of the rendered conversation and its `assistant_masks` (1 on assistant tokens)."""
    if not getattr(tokenizer, "is_fast", False):
        raise ChatTemplateError("assistant masks need a fast tokenizer (character offsets)")
    text, spans = assistant_char_spans(tokenizer, messages)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = [int(i) for i in encoded["input_ids"]]
    mask = [0] * len(ids)
    for t, (start, end) in enumerate(encoded["offset_mapping"]):
        if end > start and any(s <= start < e for s, e in spans):
            mask[t] = 1
    return ids, mask


@dataclass
class SFTRowCounts:
    rows_in: int = 0
    rows_kept: int = 0
    empty_dropped: int = 0
    too_long_truncated: int = 0
    too_long_dropped: int = 0


def _check_messages(value: Any, where: str) -> list[Message]:
    if not isinstance(value, list) or not all(isinstance(m, dict) and "role" in m and "content" in m for m in value):
        raise SFTRowError(f"{where}: expected a list of {{role, content}} messages, got {type(value).__name__}")
    return [{"role": str(m["role"]), "content": str(m["content"] or "")} for m in value]


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


def tokenize_sft_dataset(
    plan: RunPlan, ds: datasets.Dataset, tokenizer: Any, column: str, name: str
) -> tuple[datasets.Dataset, SFTRowCounts]:
    """Tokenize, then apply the row policy (empty answers, too long); returns kept rows and the counts."""
    data = plan.recipe.data
    policy = data.policy
    limit = sequence_limit(plan)

    def tokenize(batch: dict[str, list[Any]], indices: list[int]) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {"input_ids": [], "assistant_masks": [], "empty": []}
        for i, value in zip(indices, batch[column]):
            messages = _check_messages(value, f"{name}, row {i}")
            ids, mask = tokenize_conversation(tokenizer, messages)
            empty = not any(m["role"] == "assistant" and m["content"].strip() for m in messages)
            out["input_ids"].append(ids)
            out["assistant_masks"].append(mask)
            out["empty"].append(empty or not any(mask))
        return out

    tokenized = ds.map(
        tokenize,
        batched=True,
        with_indices=True,
        remove_columns=ds.column_names,
        num_proc=data.num_proc,
        desc=f"tokenizing {name}",
    )
    counts = SFTRowCounts(rows_in=len(tokenized))
    keep: list[int] = []
    truncate: dict[int, int] = {}
    for i, (ids, mask, empty) in enumerate(zip(tokenized["input_ids"], tokenized["assistant_masks"], tokenized["empty"])):
        if empty:
            if policy.empty_response == "raise":
                raise SFTRowError(f"{name}, row {i}: no assistant answer; data.policy.empty_response is 'raise'")
            counts.empty_dropped += 1
            continue
        if len(ids) > limit:
            if policy.too_long == "raise":
                raise SFTRowError(
                    f"{name}, row {i}: {len(ids)} tokens > {limit} (data.max_length, or data.pack_length when "
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
    kept = kept.remove_columns(["empty"])
    counts.rows_kept = len(kept)
    return kept, counts


def load_sft_dataset(plan: RunPlan, tokenizer: Any, split: str) -> tuple[datasets.Dataset | None, dict[str, Any]]:
    """All sources of one split, columns checked, tokenized, policy applied, concatenated (None if no sources)."""
    import datasets

    from spo_align.train.columns import require_columns

    data = plan.recipe.data
    sources = data.train if split == "train" else data.eval
    if not sources:
        return None, {}
    parts = []
    counts: dict[str, Any] = {}
    for index, source in enumerate(sources):
        if source.format not in ("auto", "messages"):
            raise SFTRowError(
                f"data.{split}[{index}].format is {source.format!r}; the sft stage reads conversations (messages)"
            )
        ds = load_source(source, plan.base_dir)
        require_columns(plan, split, index, ds, ["messages"])  # type: ignore[arg-type]
        ds = sample_source(ds, source, shuffle=split == "train" and data.shuffle, seed=plan.recipe.training.seed)
        name = f"{source.path} [{source.split}]"
        tokenized, row_counts = tokenize_sft_dataset(plan, ds, tokenizer, source.columns.messages, name)
        counts[name] = asdict(row_counts)
        logger.info("%s: %s", name, asdict(row_counts))
        parts.append(tokenized)
    merged = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    if len(merged) == 0:
        raise SFTRowError(f"data.{split}: no usable conversations left after the row policy ({counts})")
    if data.packing:
        conversations = len(merged)
        merged = pack_conversations(
            merged, plan.pack_length or data.max_length, shuffle=data.shuffle and split == "train", seed=plan.recipe.training.seed
        )
        counts["packed"] = {"conversations": conversations, "rows": len(merged)}
        logger.info("data.%s: packed %d conversations into %d rows", split, conversations, len(merged))
    return merged, counts


def sft_config_kwargs(plan: RunPlan) -> dict[str, Any]:
    """The SFTConfig fields beyond the shared training arguments."""
    data = plan.recipe.data
    packing = data.packing
    kwargs: dict[str, Any] = {
        "max_length": (plan.pack_length or data.max_length) if packing else data.max_length,
        # With packing the rows arrive packed (pack_conversations); packing + "bfd" here only turns on TRL's
        # padding-free collator, which reads seq_lengths. TRL's own preparation is skipped.
        "packing": packing,
        "packing_strategy": "bfd",
        "assistant_only_loss": False,  # the assistant_masks column below already restricts the loss
        "completion_only_loss": False,
        "dataset_num_proc": data.num_proc,
        "shuffle_dataset": data.shuffle,
    }
    if packing:
        kwargs["dataset_kwargs"] = {"skip_prepare_dataset": True}
    return kwargs


def run_sft(plan: RunPlan, ctx: RunContext) -> None:
    from trl import SFTConfig, SFTTrainer

    from spo_align.train.args import build_training_args
    from spo_align.train.model import apply_adapter, apply_dropout_setting, load_model, load_tokenizer
    from spo_align.train.one_device import device_info
    from spo_align.train.run import train_and_save

    args = build_training_args(plan, ctx.output_dir, SFTConfig, **sft_config_kwargs(plan))
    ctx.run_info["device"] = device_info(args, plan)
    tokenizer = load_tokenizer(plan)
    train_ds, train_counts = load_sft_dataset(plan, tokenizer, "train")
    eval_ds, eval_counts = load_sft_dataset(plan, tokenizer, "eval")
    ctx.run_info["row_policy"] = {"train": train_counts, "eval": eval_counts}
    ctx.run_info["train_rows"] = len(train_ds) if train_ds is not None else 0
    ctx.run_info["train_tokens"] = int(sum(len(ids) for ids in train_ds["input_ids"])) if train_ds is not None else 0

    model = apply_adapter(load_model(plan), plan)
    ctx.run_info["dropout_disabled"] = apply_dropout_setting(model, plan)
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        callbacks=ctx.callbacks,
    )
    train_and_save(trainer, ctx)
