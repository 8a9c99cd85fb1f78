"""What a run shows while it trains: a rich bar in a terminal, plain lines everywhere else.

Where stdout is no terminal (`docker logs`, `nohup`, `| tee`, CI) a bar is invisible until the run ends, so
`ProgressCallback` prints one plain line per logging step instead, and a heartbeat line whenever nothing was
printed for `SPO_PROGRESS_HEARTBEAT_S` seconds (60 by default): a long step, an evaluation or a checkpoint
still shows the run is alive. `SPO_PROGRESS=bar|plain` overrides the choice. Main process only.

A plain line reads, for example::

    [spo] spo step 20/120 (16.7%) | elapsed 1m40s | eta 8m20s | loss 0.412 | spo_m -0.331 spo_r -0.08 |
          log-ratio chosen +0.53 rejected -1.21 | 182 tok/s

(one line in the log). Log-ratios are the logged rewards divided by the loss's reward scale (β; 2τ for IPO),
tokens/s the real (non-padding) tokens trained since the previous line, from the cumulative `num_tokens`.
"""

from __future__ import annotations

import math
import os
import sys
import threading
import time
from typing import Any, TextIO

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from spo_align.losses.registry import logged_metrics

PROGRESS_ENV = "SPO_PROGRESS"
HEARTBEAT_ENV = "SPO_PROGRESS_HEARTBEAT_S"
DEFAULT_HEARTBEAT_S = 60.0

# What the bar and the plain lines show when a stage logs it, in this order, with a short label (the loss
# metrics and their labels come from the loss catalogue).
PROGRESS_FIELDS: tuple[tuple[str, str], ...] = (
    ("loss", "loss"),
    ("learning_rate", "lr"),
    *((metric.name, metric.label) for metric in logged_metrics()),
    ("mean_token_accuracy", "tok_acc"),
)
_LOG_RATIO_KEYS = ("rewards/chosen", "rewards/rejected")


def format_values(values: dict[str, Any]) -> str:
    parts = []
    for key, label in PROGRESS_FIELDS:
        value = values.get(key)
        if isinstance(value, (int, float)):
            parts.append(f"{label} {value:.3g}")
    return "  ".join(parts)


def format_duration(seconds: float) -> str:
    """`45s`, `3m05s`, `2h07m`: short and of fixed meaning in a log."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def progress_mode(stream: TextIO | None = None) -> str:
    """`bar` in a terminal, `plain` elsewhere; `SPO_PROGRESS` overrides (a wrong value is an error)."""
    chosen = os.environ.get(PROGRESS_ENV, "").strip().lower()
    if chosen in ("bar", "plain"):
        return chosen
    if chosen:
        raise ValueError(f"{PROGRESS_ENV}={chosen!r}: use 'bar' or 'plain' (or leave it unset)")
    stream = stream if stream is not None else sys.stdout
    return "bar" if stream.isatty() else "plain"


def heartbeat_seconds() -> float:
    raw = os.environ.get(HEARTBEAT_ENV)
    if raw is None or not raw.strip():
        return DEFAULT_HEARTBEAT_S
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{HEARTBEAT_ENV}={raw!r}: not a number of seconds") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{HEARTBEAT_ENV}={raw!r}: must be a positive number of seconds")
    return value


class ProgressBar:
    """The rich bar: steps done, ETA, and a short line of the latest values."""

    def __init__(self, total: int, description: str = "train"):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(bar_width=20),
            MofNCompleteColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[values]}"),
            transient=False,
        )
        self._task = self._progress.add_task(description, total=total, values="")
        self._progress.start()

    def update(self, completed: int, values: dict[str, Any] | None = None) -> None:
        fields: dict[str, Any] = {"completed": completed}
        line = format_values(values) if values is not None else ""
        if line:  # the closing summary (train_runtime, ...) keeps the last step's values on the bar
            fields["values"] = line
        self._progress.update(self._task, **fields)

    def close(self) -> None:
        self._progress.stop()


class PlainProgress:
    """Plain progress lines on `stream`: one per logged record, a heartbeat when quiet for `heartbeat_s`."""

    def __init__(
        self,
        total: int,
        description: str = "train",
        *,
        start_step: int = 0,
        start_tokens: float | None = None,
        reward_scale: float | None = None,
        heartbeat_s: float = DEFAULT_HEARTBEAT_S,
        stream: TextIO | None = None,
        clock: Any = time.monotonic,
    ):
        self.total = total
        self.description = description
        self.reward_scale = reward_scale
        self.heartbeat_s = heartbeat_s
        self.stream = stream if stream is not None else sys.stdout
        self._clock = clock
        self._lock = threading.Lock()
        self._started = clock()
        self._start_step = start_step
        self._step = start_step
        self._last_printed = self._started
        self._last_tokens: tuple[float, float] | None = (
            None if start_tokens is None else (self._started, float(start_tokens))
        )
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lines

    def _emit(self, text: str) -> None:
        with self._lock:
            self.stream.write(f"[spo] {self.description} {text}\n")
            self.stream.flush()
            self._last_printed = self._clock()

    def _position(self, now: float) -> str:
        elapsed = now - self._started
        parts = [f"step {self._step}/{self.total}" + (f" ({100 * self._step / self.total:.1f}%)" if self.total else "")]
        parts.append(f"elapsed {format_duration(elapsed)}")
        done = self._step - self._start_step
        if done > 0 and self.total:
            parts.append(f"eta {format_duration(elapsed / done * max(self.total - self._step, 0))}")
        else:
            parts.append("eta ?")
        return " | ".join(parts)

    def _log_ratios(self, values: dict[str, Any]) -> str:
        if not self.reward_scale or not all(isinstance(values.get(k), (int, float)) for k in _LOG_RATIO_KEYS):
            return ""
        chosen, rejected = (float(values[k]) / self.reward_scale for k in _LOG_RATIO_KEYS)
        return f"log-ratio chosen {chosen:+.3g} rejected {rejected:+.3g}"

    def _tokens_per_second(self, now: float, values: dict[str, Any]) -> str:
        tokens = values.get("num_tokens")
        if not isinstance(tokens, (int, float)):
            return ""
        previous, self._last_tokens = self._last_tokens, (now, float(tokens))
        if previous is None or now <= previous[0]:
            return ""
        return f"{(float(tokens) - previous[1]) / (now - previous[0]):.0f} tok/s"

    def start(self) -> None:
        self._emit(f"started: {self._position(self._clock())}")
        self._thread = threading.Thread(target=self._heartbeat, name="spo-progress-heartbeat", daemon=True)
        self._thread.start()

    def step(self, step: int) -> None:
        self._step = step

    def log(self, step: int, values: dict[str, Any]) -> None:
        self._step = step
        now = self._clock()
        evaluation = {k.removeprefix("eval_"): v for k, v in values.items() if k.startswith("eval_")}
        if evaluation:
            values = evaluation
        loss_line = format_values({k: v for k, v in values.items() if not k.startswith("rewards/")})
        if evaluation:
            loss_line = f"eval {loss_line}"
        summary = "train_runtime" in values  # the closing record: no new tokens since the last line
        tokens = "" if evaluation or summary else self._tokens_per_second(now, values)
        parts = [self._position(now), loss_line, self._log_ratios(values), tokens]
        if summary:
            parts.append(f"finished in {format_duration(float(values['train_runtime']))}")
        self._emit(" | ".join(p for p in parts if p))

    def _heartbeat(self) -> None:
        while not self._stop.wait(min(self.heartbeat_s, 5.0)):
            now = self._clock()
            if now - self._last_printed >= self.heartbeat_s:
                quiet = format_duration(now - self._last_printed)
                self._emit(f"{self._position(now)} | working on step {self._step + 1} (no log line for {quiet})")

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None


def _restored_tokens(state: TrainerState) -> float | None:
    """The cumulative token count a continued run starts from: its last logged `num_tokens` (0 at a new start)."""
    for entry in reversed(state.log_history or []):
        if isinstance(entry.get("num_tokens"), (int, float)):
            return float(entry["num_tokens"])
    return 0.0 if state.global_step == 0 else None


class ProgressCallback(TrainerCallback):
    """Drive the bar or the plain lines from the Trainer (main process only)."""

    def __init__(self, description: str = "train", *, reward_scale: float | None = None, mode: str | None = None):
        self.description = description
        self.reward_scale = reward_scale
        self.mode = mode or progress_mode()
        self.heartbeat_s = heartbeat_seconds()
        self._bar: ProgressBar | None = None
        self._plain: PlainProgress | None = None

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        if not state.is_world_process_zero:
            return
        if self.mode == "bar":
            self._bar = ProgressBar(state.max_steps, self.description)
            self._bar.update(state.global_step)
        else:
            self._plain = PlainProgress(
                state.max_steps, self.description, start_step=state.global_step,
                start_tokens=_restored_tokens(state), reward_scale=self.reward_scale, heartbeat_s=self.heartbeat_s,
            )
            self._plain.start()

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        if self._bar is not None:
            self._bar.update(state.global_step)
        if self._plain is not None:
            self._plain.step(state.global_step)

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, Any] | None = None,
        **kwargs: Any,
    ):
        if not logs:
            return
        if self._bar is not None:
            self._bar.update(state.global_step, logs)
        if self._plain is not None:
            self._plain.log(state.global_step, logs)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._plain is not None:
            self._plain.close()
            self._plain = None
