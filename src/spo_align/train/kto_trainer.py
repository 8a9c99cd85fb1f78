"""TRL's KTOTrainer, fed examples this project has already tokenized.

TRL 1.16 tokenizes KTO examples itself and, where tokens merge across the prompt/completion boundary, moves the
prompt's last tokens into the completion (a warning says the model then trains on a context it never sees at
inference). Examples here are tokenized by `spo_align.data.tokenize`, the rule every stage shares, so this
subclass takes rows that already hold ``prompt_ids``/``completion_ids``/``label`` and runs only the step TRL does
after tokenizing: the KL completions, each example's completion rotated by one within its batch of
``per_device_train_batch_size`` (TRL's mismatched pairs for the KL reference point). Rows in any other shape go
through TRL's own preparation. `tests/train/test_train_kto.py` checks that both paths give TRL's columns for
rows that tokenize the same either way, and fails if TRL changes how it prepares them.
"""

from __future__ import annotations

from typing import Any

from trl import KTOTrainer

TOKENIZED = ("prompt_ids", "completion_ids", "label")


def is_tokenized(dataset: Any) -> bool:
    columns = getattr(dataset, "column_names", None) or []
    return all(c in columns for c in TOKENIZED) and "prompt" not in columns


class PretokenizedKTOTrainer(KTOTrainer):
    """A `KTOTrainer` whose datasets may already be tokenized (see the module doc)."""

    def _prepare_dataset(self, dataset: Any, processing_class: Any, args: Any, dataset_name: str) -> Any:
        if not is_tokenized(dataset):
            return super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        if not getattr(self, "calculate_KL", False):
            return dataset

        def add_kl_completions(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
            completions = batch["completion_ids"]
            return {"KL_completion_ids": [completions[-1], *completions[:-1]]}

        return dataset.map(
            add_kl_completions,
            batched=True,
            batch_size=args.per_device_train_batch_size,
            desc=f"KL completions of the {dataset_name} dataset",
        )
