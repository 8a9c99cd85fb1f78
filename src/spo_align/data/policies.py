"""Row policies: what happens to rows that cannot be trained on as they are. One mechanism for every stage.

Checked in this order, each row counted once, under the first rule it breaks (`data.policy` sets each action):
1. empty prompt (the turn the answer replies to is blank; SFT: a blank user turn): drop or raise;
2. empty response (an answer blank after stripping whitespace; SFT: no assistant text): drop or raise;
3. token boundary (see `spo_align.data.tokenize`): a row whose answer had to be tokenized apart from its prompt
   is kept and counted (``split``), dropped, or refused; a row whose template renders the prompt differently
   inside the conversation is dropped (``template_mismatch_dropped``) unless the action is ``raise``;
4. too long (prompt + answer over ``max_length`` tokens): truncate the answer (the prompt is kept whole; a prompt
   that leaves no room for any answer token is dropped and counted as such), drop, or raise;
5. identical pair (preference pairs; chosen == rejected compared on the answer ids after any truncation, so a
   pair that only differed past the cut is caught too): drop or raise.
A refused row is named by where it came from (file:line, or dataset and row), never by its shuffled position.
The counts go to the log and to ``run.json`` (``row_policy``: per split, per source and in total).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any

from spo_align.data.messages import prompt_is_blank
from spo_align.data.sources import ROW_COLUMN
from spo_align.recipe.schema import RowPolicy

if TYPE_CHECKING:
    import datasets

logger = logging.getLogger(__name__)


class RowPolicyError(ValueError):
    """A row broke a rule whose policy is `raise`, or the policies left no row at all."""


@dataclass
class RowCounts:
    rows_in: int = 0
    rows_kept: int = 0
    empty_prompt_dropped: int = 0
    empty_dropped: int = 0
    template_mismatch_dropped: int = 0
    boundary_dropped: int = 0
    boundary_split: int = 0
    """Kept: the answer was tokenized apart from its prompt (tokens merged across the boundary)."""
    too_long_truncated: int = 0
    too_long_dropped: int = 0
    prompt_too_long_dropped: int = 0
    identical_dropped: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    def __add__(self, other: RowCounts) -> RowCounts:
        return RowCounts(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})


def _fail(where: str, rule: str, detail: str, key: str) -> RowPolicyError:
    return RowPolicyError(f"{where}: {rule} ({detail}); data.policy.{key} is 'raise'")


def _column(ds: datasets.Dataset, name: str, default: Any) -> list[Any]:
    return ds[name] if name in ds.column_names else [default] * len(ds)


def _where(rows: list[Any], i: int) -> str:
    return rows[i] if rows[i] is not None else f"row {i}"


def screen(
    policy: RowPolicy,
    counts: RowCounts,
    where: str,
    *,
    prompt_blank: bool,
    answer_blank: bool,
    boundary: str,
) -> bool:
    """Rules 1-3 for one row: True to keep it; counts a drop; raises under `raise`."""
    if prompt_blank:
        if policy.empty_prompt == "raise":
            raise _fail(where, "empty prompt", "the turn the answer replies to is blank", "empty_prompt")
        counts.empty_prompt_dropped += 1
        return False
    if answer_blank:
        if policy.empty_response == "raise":
            raise _fail(where, "empty response", "an answer is empty", "empty_response")
        counts.empty_dropped += 1
        return False
    if boundary == "mismatch":
        if policy.token_boundary == "raise":
            raise _fail(
                where, "template mismatch",
                "the chat template renders the prompt differently inside the conversation", "token_boundary",
            )
        counts.template_mismatch_dropped += 1
        return False
    if boundary == "split":
        if policy.token_boundary == "raise":
            raise _fail(
                where, "token boundary", "the answer's first tokens merge with the prompt's last ones", "token_boundary"
            )
        if policy.token_boundary == "drop":
            counts.boundary_dropped += 1
            return False
        counts.boundary_split += 1
    return True


def _room(policy: RowPolicy, counts: RowCounts, where: str, prompt: int, answer: int, max_length: int) -> int | None:
    """Rule 4: the answer tokens that fit (None: drop the row)."""
    if prompt + answer <= max_length:
        return answer
    if policy.too_long == "raise":
        raise _fail(where, "too long", f"{prompt} prompt + {answer} answer tokens > {max_length}", "too_long")
    if policy.too_long == "drop":
        counts.too_long_dropped += 1
        return None
    room = max_length - prompt
    if room < 1:
        counts.prompt_too_long_dropped += 1
        return None
    counts.too_long_truncated += 1
    return room


def _finish(ds: datasets.Dataset, keep: list[int], replaced: dict[str, list[list[int]]], counts: RowCounts):
    counts.rows_kept = len(keep)
    kept = ds.select(keep)
    for column, values in replaced.items():
        kept = kept.remove_columns([column]).add_column(column, values)
    logger.info("row policy: %s", counts.as_dict())
    return kept, counts


def left_nothing(counts: RowCounts, what: str) -> RowPolicyError:
    nonzero = {k: v for k, v in counts.as_dict().items() if v}
    return RowPolicyError(f"the row policy left no {what} out of {counts.rows_in}: {nonzero}")


def apply_pair_policy(
    ds: datasets.Dataset, policy: RowPolicy, max_length: int, *, text_columns: bool = True, require_rows: bool = True
) -> tuple[datasets.Dataset, RowCounts]:
    """Apply `policy` to a tokenized pair dataset; return the kept rows (with truncated ids) and the counts."""
    counts = RowCounts(rows_in=len(ds))
    prompts, chosens, rejecteds = ds["prompt_ids"], ds["chosen_ids"], ds["rejected_ids"]
    texts = text_columns and "chosen" in ds.column_names
    chosen_text = ds["chosen"] if texts else [None] * len(ds)
    rejected_text = ds["rejected"] if texts else [None] * len(ds)
    prompt_msgs = _column(ds, "prompt", None) if text_columns else [None] * len(ds)
    boundaries = _column(ds, "boundary", "joint")
    rows = _column(ds, ROW_COLUMN, None)
    keep: list[int] = []
    new_chosen: list[list[int]] = []
    new_rejected: list[list[int]] = []
    for i, (p, c, r) in enumerate(zip(prompts, chosens, rejecteds)):
        where = _where(rows, i)
        blank = any(t is not None and not t.strip() for t in (chosen_text[i], rejected_text[i]))
        mismatch = boundaries[i] == "mismatch"
        ok = screen(
            policy, counts, where,
            prompt_blank=isinstance(prompt_msgs[i], list) and prompt_is_blank(prompt_msgs[i]),
            answer_blank=blank or (not mismatch and (not c or not r)),
            boundary=boundaries[i],
        )
        if not ok:
            continue
        room = _room(policy, counts, where, len(p), max(len(c), len(r)), max_length)
        if room is None:
            continue
        c, r = c[:room], r[:room]
        if c == r:
            if policy.identical_pair == "raise":
                raise _fail(where, "identical pair", "chosen equals rejected", "identical_pair")
            counts.identical_dropped += 1
            continue
        keep.append(i)
        new_chosen.append(c)
        new_rejected.append(r)
    kept, counts = _finish(ds, keep, {"chosen_ids": new_chosen, "rejected_ids": new_rejected}, counts)
    if require_rows and counts.rows_kept == 0 and counts.rows_in > 0:
        raise left_nothing(counts, "pairs")
    return kept, counts


def apply_completion_policy(
    ds: datasets.Dataset, policy: RowPolicy, max_length: int, *, require_rows: bool = True
) -> tuple[datasets.Dataset, RowCounts]:
    """The same rules for unpaired examples (``prompt``/``completion`` text, ``prompt_ids``/``completion_ids``)."""
    counts = RowCounts(rows_in=len(ds))
    prompt_msgs, completions = ds["prompt"], ds["completion"]
    boundaries = _column(ds, "boundary", "joint")
    rows = _column(ds, ROW_COLUMN, None)
    keep: list[int] = []
    new_ids: list[list[int]] = []
    for i, (p, c) in enumerate(zip(ds["prompt_ids"], ds["completion_ids"])):
        where = _where(rows, i)
        mismatch = boundaries[i] == "mismatch"
        ok = screen(
            policy, counts, where,
            prompt_blank=prompt_is_blank(prompt_msgs[i]),
            answer_blank=not completions[i].strip() or (not mismatch and not c),
            boundary=boundaries[i],
        )
        if not ok:
            continue
        room = _room(policy, counts, where, len(p), len(c), max_length)
        if room is None:
            continue
        keep.append(i)
        new_ids.append(c[:room])
    kept, counts = _finish(ds, keep, {"completion_ids": new_ids}, counts)
    if require_rows and counts.rows_kept == 0 and counts.rows_in > 0:
        raise left_nothing(counts, "examples")
    return kept, counts
