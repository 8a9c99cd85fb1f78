"""Unpaired rows (what KTO trains on): desirable/undesirable examples, tokenized like the pairs, every batch
mixing both classes.

Paired data (any layout `data/pairs.py` reads) goes through the pair row policy, then is unpaired: each pair gives
a desirable (chosen) and an undesirable (rejected) example. Rows already in KTO layout (`format: kto`: prompt /
completion / label) are converted (labels read strictly, see `parse_label`), tokenized by the same rule and put
through the same policy for single answers. KTO reads its data in order (its KL estimate needs
`train_sampling_strategy="sequential"`), so the two classes are shuffled separately, interleaved, and shuffled
within each block of `per_device_batch_size`: every batch holds both classes and no batch holds both answers of
one pair by construction.
"""

from __future__ import annotations

import logging
import random
from typing import TYPE_CHECKING, Any

from spo_align.data.messages import (
    Message,
    RowFormatError,
    as_messages,
    content_text,
    describe,
    is_message_list,
)
from spo_align.data.pairs import pair_columns, prepare_pairs, source_name
from spo_align.data.policies import RowCounts, apply_completion_policy, left_nothing
from spo_align.data.sources import ROW_COLUMN, load_source, sample_source

if TYPE_CHECKING:
    import datasets

    from spo_align.recipe.resolve import RunPlan
    from spo_align.recipe.schema import DatasetSource

logger = logging.getLogger(__name__)

KTO_COLUMNS = ("prompt_ids", "completion_ids", "label")
_TRUE = {"true", "1", "yes", "y", "desirable", "good", "chosen"}
_FALSE = {"false", "0", "no", "n", "undesirable", "bad", "rejected"}


def parse_label(value: Any, where: str, column: str) -> bool:
    """A KTO label: a boolean, 0/1, or one of the obvious words ("true"/"false", "yes"/"no", ...).

    Anything else (null, 2, "maybe") is refused: ``bool("false")`` is True, and a silently flipped label trains
    the model towards the answers it should move away from.
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise RowFormatError(
        f"{where}: {column!r} is {describe(value)}; a KTO label must be true/false, 1/0 or yes/no"
    )


def _prompt(value: Any, where: str) -> list[Message]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    return as_messages(value, where, "prompt")


def _completion(value: Any, where: str) -> str:
    if is_message_list(value):
        answers = [m for m in as_messages(value, where, "completion") if m["role"] == "assistant"]
        if not answers:
            raise RowFormatError(f"{where}: 'completion' is a message list without an assistant message")
        return answers[-1]["content"]
    return content_text(value, where, "completion")


def kto_rows(ds: datasets.Dataset, source: DatasetSource) -> datasets.Dataset:
    """A source in KTO layout -> ``prompt`` (messages), ``completion`` (text), ``label`` (bool), row origin."""
    cols = source.columns

    def convert(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {"prompt": [], "completion": [], "label": [], ROW_COLUMN: batch[ROW_COLUMN]}
        for where, prompt, completion, label in zip(batch[ROW_COLUMN], batch[cols.prompt], batch[cols.completion], batch[cols.label]):
            out["prompt"].append(_prompt(prompt, where))
            out["completion"].append(_completion(completion, where))
            out["label"].append(parse_label(label, where, cols.label))
        return out

    return ds.map(convert, batched=True, remove_columns=ds.column_names, desc=f"examples from {source.path}")


def interleave_classes(labels: list[bool], block: int, seed: int) -> list[int]:
    """An order of the examples in which every block of `block` consecutive ones mixes both classes.

    Desirable and undesirable indices are shuffled separately, interleaved (one of each in turn while both
    last), and each block is shuffled. With equal class sizes and `block` >= 2 every block holds both.
    """
    rng = random.Random(seed)
    good = [i for i, label in enumerate(labels) if label]
    bad = [i for i, label in enumerate(labels) if not label]
    rng.shuffle(good)
    rng.shuffle(bad)
    order: list[int] = []
    for k in range(max(len(good), len(bad))):
        if k < len(good):
            order.append(good[k])
        if k < len(bad):
            order.append(bad[k])
    out: list[int] = []
    for start in range(0, len(order), block):
        chunk = order[start : start + block]
        rng.shuffle(chunk)
        out.extend(chunk)
    return out


def unpair(pairs: datasets.Dataset) -> datasets.Dataset:
    """Tokenized pairs -> one desirable and one undesirable tokenized example per pair, in pair order."""
    import datasets

    prompts: list[list[int]] = []
    completions: list[list[int]] = []
    labels: list[bool] = []
    for prompt, chosen, rejected in zip(pairs["prompt_ids"], pairs["chosen_ids"], pairs["rejected_ids"]):
        for answer, label in ((chosen, True), (rejected, False)):
            prompts.append(prompt)
            completions.append(answer)
            labels.append(label)
    return datasets.Dataset.from_dict({"prompt_ids": prompts, "completion_ids": completions, "label": labels})


def _kto_source(plan: RunPlan, split: str, index: int, source: DatasetSource, tokenizer: Any, shuffle: bool):
    from spo_align.data.columns import require_columns
    from spo_align.data.tokenize import tokenize_completions

    data = plan.recipe.data
    ds = load_source(source, plan.base_dir)
    require_columns(plan, split, index, ds, ["prompt", "completion", "label"])  # type: ignore[arg-type]
    ds = sample_source(ds, source, shuffle=shuffle, seed=plan.recipe.training.seed)
    tokenized = tokenize_completions(kto_rows(ds, source), tokenizer, num_proc=data.num_proc)
    kept, counts = apply_completion_policy(tokenized, data.policy, data.max_length, require_rows=False)
    return kept.select_columns(list(KTO_COLUMNS)), counts


def load_kto_dataset(plan: RunPlan, tokenizer: Any, split: str) -> tuple[datasets.Dataset | None, dict[str, Any]]:
    """All sources of a split as tokenized examples (``prompt_ids``, ``completion_ids``, ``label``) in an order in
    which every batch mixes labels; and the split's row-policy report ``{"total": ..., "by_source": ...}``."""
    import datasets

    data = plan.recipe.data
    sources = data.train if split == "train" else data.eval
    if not sources:
        return None, {}
    shuffle = data.shuffle and split == "train"
    parts = []
    total = RowCounts()
    by_source: dict[str, dict[str, int]] = {}
    for index, source in enumerate(sources):
        if source.format == "kto":
            rows, counts = _kto_source(plan, split, index, source, tokenizer, shuffle)
            report = counts.as_dict()
            total = total + counts
        else:
            pairs = _paired_source(plan, split, index, source, tokenizer, shuffle)
            rows, report = unpair(pairs.dataset), pairs.counts["total"]
            total = total + RowCounts(**report)
        by_source[source_name(source)] = report
        logger.info("%s: %s", source_name(source), report)
        parts.append(rows)
    merged = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    if len(merged) == 0:
        raise left_nothing(total, f"examples in data.{split}")
    order = interleave_classes(list(merged["label"]), plan.recipe.training.per_device_batch_size, plan.recipe.training.seed)
    merged = merged.select(order)
    n_good = sum(merged["label"])
    logger.info("%s: %d desirable, %d undesirable examples", split, n_good, len(merged) - n_good)
    return merged, {"total": total.as_dict(), "by_source": by_source}


def _paired_source(plan: RunPlan, split: str, index: int, source: DatasetSource, tokenizer: Any, shuffle: bool):
    from spo_align.data.columns import require_columns

    def check(_: int, ds: datasets.Dataset) -> None:
        require_columns(plan, split, index, ds, pair_columns(source, ds))  # type: ignore[arg-type]

    return prepare_pairs(
        [source], plan.recipe.data, tokenizer, base_dir=plan.base_dir, seed=plan.recipe.training.seed,
        shuffle=shuffle, check_columns=check, require_rows=False,
    )

