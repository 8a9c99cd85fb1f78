"""Row policies for preference pairs: what happens to rows that cannot be trained on as they are.

Checked in this order, each row counted once, under the first rule it breaks:
1. empty response (chosen or rejected blank after stripping whitespace): drop or raise;
2. too long (prompt + answer over ``max_length`` tokens): truncate the answer (the prompt is kept whole;
   a prompt that leaves no room for any answer token is dropped and counted as such), drop, or raise;
3. identical pair (chosen == rejected, compared on the answer ids after any truncation, so an answer
   pair that only differed past the cut is caught too): drop or raise.
The counts go to the log and to ``run.json`` at the start of the run.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from spo_align.recipe.schema import RowPolicy

if TYPE_CHECKING:
    import datasets

logger = logging.getLogger(__name__)


class RowPolicyError(ValueError):
    """A row broke a rule whose policy is `raise`."""


@dataclass
class PolicyCounts:
    rows_in: int = 0
    rows_kept: int = 0
    empty_dropped: int = 0
    too_long_truncated: int = 0
    too_long_dropped: int = 0
    prompt_too_long_dropped: int = 0
    identical_dropped: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def _fail(rule: str, index: int, detail: str) -> RowPolicyError:
    return RowPolicyError(f"row {index}: {rule} ({detail}); policy for this rule is 'raise'")


def apply_pair_policy(
    ds: datasets.Dataset, policy: RowPolicy, max_length: int, *, text_columns: bool = True
) -> tuple[datasets.Dataset, PolicyCounts]:
    """Apply `policy` to a tokenized pair dataset; return the kept rows (with truncated ids) and the counts."""
    counts = PolicyCounts(rows_in=len(ds))
    prompts, chosens, rejecteds = ds["prompt_ids"], ds["chosen_ids"], ds["rejected_ids"]
    chosen_text = ds["chosen"] if text_columns else [None] * len(ds)
    rejected_text = ds["rejected"] if text_columns else [None] * len(ds)
    keep: list[int] = []
    new_chosen: list[list[int]] = []
    new_rejected: list[list[int]] = []
    for i, (p, c, r) in enumerate(zip(prompts, chosens, rejecteds)):
        empty = (chosen_text[i] is not None and not chosen_text[i].strip()) or (
            rejected_text[i] is not None and not rejected_text[i].strip()
        )
        if empty or not c or not r:
            if policy.empty_response == "raise":
                raise _fail("empty response", i, "chosen or rejected answer is empty")
            counts.empty_dropped += 1
            continue
        if len(p) + max(len(c), len(r)) > max_length:
            if policy.too_long == "raise":
                raise _fail("too long", i, f"{len(p)} prompt + {max(len(c), len(r))} answer tokens > {max_length}")
            if policy.too_long == "drop":
                counts.too_long_dropped += 1
                continue
            room = max_length - len(p)
            if room < 1:
                counts.prompt_too_long_dropped += 1
                continue
            c, r = c[:room], r[:room]
            counts.too_long_truncated += 1
        if c == r:
            if policy.identical_pair == "raise":
                raise _fail("identical pair", i, "chosen equals rejected")
            counts.identical_dropped += 1
            continue
        keep.append(i)
        new_chosen.append(c)
        new_rejected.append(r)
    counts.rows_kept = len(keep)
    kept = ds.select(keep)
    kept = kept.remove_columns(["chosen_ids", "rejected_ids"])
    kept = kept.add_column("chosen_ids", new_chosen).add_column("rejected_ids", new_rejected)
    logger.info("row policy: %s", counts.as_dict())
    if counts.rows_kept == 0 and counts.rows_in > 0:
        raise RowPolicyError(f"row policy left no rows out of {counts.rows_in}: {counts.as_dict()}")
    return kept, counts

