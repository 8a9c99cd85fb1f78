"""Pairwise judging of every pair of models on every prompt, in both orders, resumable.

Python API:

    judge = OpenAIJudge("gpt-4o")                      # or ReferenceJudge() for tasks with answers
    plan = plan_judging(gen_dir, judge, out)           # calls still to make, estimated tokens
    summary = judge_all(gen_dir, judge, out, concurrency=8)

`gen_dir` holds one `<model>.jsonl` per model (written by `generate`). Every unordered pair of
models is judged on every prompt twice, once with each model shown as A. Each judgment is appended
to `out` as it arrives (see `judge_store`); a rerun skips keys already judged `ok`, and with
`retry_errors=True` also retries keys recorded as errors. Two identical answers are recorded as a
tie without a call. How both orders combine into one outcome per prompt is `table.py`'s business.

A `Judge` is anything with `model`, `prompt_version`, `needs_reference`, `judge(item)` and
`estimate_tokens(item)`: `OpenAIJudge` (judge_client.py) and `ReferenceJudge`
(reference_judge.py) are the two shipped.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from spo_align.eval.judge_parse import Verdict
from spo_align.eval.judge_store import (
    MAX_ERROR_CHARS,
    MAX_STORED_REPLY_CHARS,
    JudgmentKey,
    JudgmentRecord,
    JudgmentStore,
    latest_by_key,
)
from spo_align.eval.records import EvalInputError, PromptRow, read_generation_file
from spo_align.eval.redact import clip

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class JudgeItem:
    """One comparison as the judge sees it: `answer_a` is shown first."""

    prompt_id: str
    question: str
    answer_a: str
    answer_b: str
    reference: str | None = None


@dataclass(frozen=True)
class JudgeResult:
    verdict: Verdict
    reply: str | None = None
    attempts: int = 1
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


class JudgeCallError(Exception):
    """This comparison could not be judged (retries spent, or an unparseable verdict): recorded and counted."""

    def __init__(self, message: str, attempts: int, reply: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.attempts = attempts
        self.reply = reply


class JudgeFatalError(Exception):
    """No comparison can succeed (bad key, unknown model): the run stops; what was recorded stays."""


class Judge(Protocol):
    @property
    def model(self) -> str: ...

    @property
    def prompt_version(self) -> str: ...

    @property
    def needs_reference(self) -> bool: ...

    def judge(self, item: JudgeItem) -> JudgeResult:
        """Raises JudgeCallError for this item, JudgeFatalError for the whole run."""
        ...

    def estimate_tokens(self, item: JudgeItem) -> tuple[int, int]:
        """Rough (prompt, completion) tokens one call for `item` costs; (0, 0) when calls are free."""
        ...


@dataclass(frozen=True)
class Generations:
    """The answers of several models to the same prompts."""

    models: tuple[str, ...]
    prompts: tuple[PromptRow, ...]
    responses: dict[str, dict[str, str]]  # model -> prompt id -> response


def load_generations(gen_dir: Path, models: Sequence[str] | None = None, exclude: Sequence[Path] = ()) -> Generations:
    """Read `<model>.jsonl` files from `gen_dir` (all of them, or the named `models`, in that order).

    All models must have answered the same prompts with the same prompt text."""
    gen_dir = Path(gen_dir)
    if not gen_dir.is_dir():
        raise EvalInputError("generation directory not found", gen_dir)
    skip = {p.resolve() for p in exclude}
    files = {p.stem: p for p in sorted(gen_dir.glob("*.jsonl")) if p.resolve() not in skip}
    if models is None:
        names = list(files)
    else:
        names = list(models)
        missing = [m for m in names if m not in files]
        if missing:
            raise EvalInputError(f"no answers for {', '.join(missing)} (expected {missing[0]}.jsonl)", gen_dir)
    if len(names) < 2:
        raise EvalInputError(f"need answers from at least two models, found {len(names)}", gen_dir)
    if len(set(names)) != len(names):
        raise EvalInputError("a model is named twice", gen_dir)
    prompts: tuple[PromptRow, ...] = ()
    responses: dict[str, dict[str, str]] = {}
    for name in names:
        records = read_generation_file(files[name])
        rows = tuple(PromptRow(r.prompt_id, r.prompt, r.reference) for r in records)
        if not rows:
            raise EvalInputError("no answers in file", files[name])
        if not prompts:
            prompts = rows
        elif {(p.id, p.prompt) for p in rows} != {(p.id, p.prompt) for p in prompts}:
            raise EvalInputError(f"answers a different set of prompts than {names[0]}.jsonl", files[name])
        responses[name] = {r.prompt_id: r.response for r in records}
    return Generations(tuple(names), prompts, responses)


def _all_items(gens: Generations, judge: Judge) -> list[tuple[JudgmentKey, JudgeItem]]:
    if judge.needs_reference:
        lacking = [p.id for p in gens.prompts if p.reference is None]
        if lacking:
            raise EvalInputError(
                f"judge {judge.model!r} needs a reference answer; {len(lacking)} prompts have none (first: {lacking[0]!r})"
            )
    items = []
    for prompt in gens.prompts:
        for first, second in itertools.combinations(gens.models, 2):
            for a, b in ((first, second), (second, first)):
                key = JudgmentKey(prompt.id, a, b, judge.model, judge.prompt_version)
                item = JudgeItem(prompt.id, prompt.prompt, gens.responses[a][prompt.id], gens.responses[b][prompt.id], prompt.reference)
                items.append((key, item))
    return items


@dataclass(frozen=True)
class JudgePlan:
    total: int  # judgments the full run holds (prompts x pairs x 2 orders)
    done: int  # already recorded ok
    errors_kept: int  # recorded as errors and not retried this run
    identical: int  # ties to record without a call
    calls: int  # judge calls this run will make (before retries)
    est_prompt_tokens: int
    est_completion_tokens: int


@dataclass(frozen=True)
class JudgeSummary:
    out: Path
    total: int
    skipped_done: int  # judged ok by an earlier run
    errors_kept: int  # errors from an earlier run, not retried
    judged: int  # judged ok in this run (identical answers included)
    identical: int
    errors: int  # recorded as errors in this run
    prompt_tokens: int
    completion_tokens: int

    @property
    def complete(self) -> bool:
        return self.skipped_done + self.judged == self.total


def _pending(
    items: list[tuple[JudgmentKey, JudgeItem]], existing: list[JudgmentRecord], retry_errors: bool
) -> tuple[list[tuple[JudgmentKey, JudgeItem]], int, int, int]:
    held = latest_by_key(existing)
    pending, done, errors_kept = [], 0, 0
    for key, item in items:
        record = held.get(key)
        if record is not None and record.status == "ok":
            done += 1
        elif record is not None and not retry_errors:
            errors_kept += 1
        else:
            pending.append((key, item))
    return pending, len(items), done, errors_kept


def plan_judging(
    gen_dir: Path,
    judge: Judge,
    out: Path,
    *,
    models: Sequence[str] | None = None,
    retry_errors: bool = False,
) -> JudgePlan:
    """What `judge_all` would do, without calling the judge or writing anything."""
    from spo_align.eval.judge_store import read_judgments

    gens = load_generations(gen_dir, models, exclude=[out])
    existing = read_judgments(out) if Path(out).is_file() else []
    pending, total, done, errors_kept = _pending(_all_items(gens, judge), existing, retry_errors)
    calls = [item for _, item in pending if item.answer_a != item.answer_b]
    estimates = [judge.estimate_tokens(item) for item in calls]
    return JudgePlan(
        total=total,
        done=done,
        errors_kept=errors_kept,
        identical=len(pending) - len(calls),
        calls=len(calls),
        est_prompt_tokens=sum(p for p, _ in estimates),
        est_completion_tokens=sum(c for _, c in estimates),
    )


def _stored(text: str | None, limit: int) -> str | None:
    return None if text is None else clip(text, limit)


def _record(key: JudgmentKey, result: JudgeResult | JudgeCallError, source: str = "judge") -> JudgmentRecord:
    """The one way a judgment is made into a record: the reply and error are redacted, then cut to length."""
    if isinstance(result, JudgeCallError):
        return JudgmentRecord(
            *key, status="error", verdict=None, reply=_stored(result.reply, MAX_STORED_REPLY_CHARS),
            error=clip(result.message, MAX_ERROR_CHARS, one_line=True), attempts=result.attempts,
        )
    return JudgmentRecord(
        *key,
        status="ok",
        verdict=result.verdict,
        reply=_stored(result.reply, MAX_STORED_REPLY_CHARS),
        attempts=result.attempts,
        prompt_tokens=result.prompt_tokens,
        completion_tokens=result.completion_tokens,
        source="identical" if source == "identical" else "judge",
    )


def _call(judge: Judge, item: JudgeItem) -> JudgeResult | JudgeCallError:
    """One judgment; whatever goes wrong with it short of JudgeFatalError is recorded, and the run goes on."""
    try:
        return judge.judge(item)
    except JudgeCallError as exc:
        return exc
    except JudgeFatalError:
        raise
    except Exception as exc:  # a judge that failed in a way it did not foresee: this judgment only
        logger.debug("prompt %s: the judge raised %s", item.prompt_id, type(exc).__name__, exc_info=True)
        return JudgeCallError(f"{type(exc).__name__}: {exc}", attempts=1)


def judge_all(
    gen_dir: Path,
    judge: Judge,
    out: Path,
    *,
    models: Sequence[str] | None = None,
    concurrency: int = 8,
    retry_errors: bool = False,
) -> JudgeSummary:
    """Judge every pending comparison, appending each judgment to `out` as it arrives.

    Raises JudgeFatalError when the judge reports that no call can succeed; EvalInputError on bad
    generation or judgments files. Everything recorded before either stays in `out`."""
    if concurrency < 1:
        raise EvalInputError(f"concurrency must be at least 1, got {concurrency}")
    out = Path(out)
    gens = load_generations(gen_dir, models, exclude=[out])
    items = _all_items(gens, judge)
    with JudgmentStore(out) as store:
        pending, total, done, errors_kept = _pending(items, store.records, retry_errors)
        logger.info(
            "%d judgments in all: %d done, %d errors kept, %d to judge with %s (%s)",
            total, done, errors_kept, len(pending), judge.model, judge.prompt_version,
        )
        judged = identical = errors = prompt_tokens = completion_tokens = 0
        calls = []
        for key, item in pending:
            if item.answer_a == item.answer_b:
                store.append(_record(key, JudgeResult("C", None, attempts=0), source="identical"))
                judged += 1
                identical += 1
            else:
                calls.append((key, item))
        step = max(1, len(calls) // 10)
        executor = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="judge")
        try:
            futures: dict[Future[JudgeResult | JudgeCallError], JudgmentKey] = {
                executor.submit(_call, judge, item): key for key, item in calls
            }
            remaining = set(futures)
            finished = 0
            while remaining:
                done_now, remaining = wait(remaining, return_when=FIRST_COMPLETED)
                fatal = next((f.exception() for f in done_now if f.exception() is not None), None)
                for future in done_now:
                    if future.exception() is not None:
                        continue
                    record = _record(futures[future], future.result())
                    store.append(record)
                    finished += 1
                    if record.status == "ok":
                        judged += 1
                        prompt_tokens += record.prompt_tokens or 0
                        completion_tokens += record.completion_tokens or 0
                    else:
                        errors += 1
                        logger.warning("judgment %s failed: %s", tuple(record.key[:3]), record.error)
                    if finished % step == 0 or finished == len(calls):
                        logger.info("judged %d/%d (%d errors)", finished, len(calls), errors)
                if fatal is not None:  # recorded what had arrived; the rest is cancelled
                    raise fatal
        finally:
            executor.shutdown(wait=False, cancel_futures=True)
    return JudgeSummary(out, total, done, errors_kept, judged, identical, errors, prompt_tokens, completion_tokens)
