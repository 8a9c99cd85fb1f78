"""A judge behind any OpenAI-compatible chat API (OpenAI, vLLM, llama.cpp, ...), via the `openai` client.

The API key is read from an environment variable (OPENAI_API_KEY by default) and handed to the
client only; it is never logged, recorded or shown in an error: every error text that leaves this
module goes through `_redact`. Retries are ours, not the client's (`max_retries=0`), so each
attempt is counted: 408/409/429, 5xx, timeouts and connection errors back off exponentially with
jitter (honouring a short `Retry-After`); a reply whose verdict cannot be parsed is asked again up
to `parse_retries` times, then recorded as an error. 401/403/404 stop the whole run.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from typing import Any

from spo_align.eval.judge import JudgeCallError, JudgeFatalError, JudgeItem, JudgeResult
from spo_align.eval.judge_parse import JudgePrompt, VerdictParseError, load_judge_prompt, parse_verdict
from spo_align.eval.records import EvalInputError

logger = logging.getLogger(__name__)

DEFAULT_KEY_ENV = "OPENAI_API_KEY"
_RETRY_STATUS = frozenset({408, 409, 429})
_FATAL_STATUS = frozenset({401, 403, 404})
_LOCAL_PLACEHOLDER_KEY = "EMPTY"


class OpenAIJudge:
    """Pairwise judge through `client.chat.completions.create`, deterministic (temperature 0)."""

    needs_reference = False

    def __init__(
        self,
        model: str,
        *,
        base_url: str | None = None,
        api_key_env: str = DEFAULT_KEY_ENV,
        prompt: JudgePrompt | None = None,
        timeout_s: float = 60.0,
        max_attempts: int = 6,
        parse_retries: int = 2,
        backoff_s: float = 1.0,
        backoff_max_s: float = 60.0,
        max_tokens: int = 512,
        expected_completion_tokens: int = 150,
    ) -> None:
        import openai

        if max_attempts < 1 or parse_retries < 0:
            raise EvalInputError("max_attempts must be >= 1 and parse_retries >= 0")
        self.model = model
        self.prompt = prompt or load_judge_prompt()
        self.prompt_version = self.prompt.version
        self.base_url = base_url
        self.max_attempts = max_attempts
        self.parse_retries = parse_retries
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self.max_tokens = max_tokens
        self.expected_completion_tokens = expected_completion_tokens
        key = os.environ.get(api_key_env, "")
        if not key:
            if base_url is None:
                raise EvalInputError(f"set the {api_key_env} environment variable to your API key")
            # Local servers (vLLM, llama.cpp) usually accept any key; the client insists on one.
            logger.info("%s is not set; sending a placeholder key to %s", api_key_env, base_url)
            key = _LOCAL_PLACEHOLDER_KEY
        self._secret = key
        self._fatal: str | None = None
        self._fatal_lock = threading.Lock()
        self._client = openai.OpenAI(api_key=key, base_url=base_url, timeout=timeout_s, max_retries=0)

    def __repr__(self) -> str:
        return f"OpenAIJudge(model={self.model!r}, base_url={self.base_url!r}, prompt={self.prompt_version!r})"

    def _redact(self, text: str) -> str:
        if self._secret and self._secret != _LOCAL_PLACEHOLDER_KEY:
            text = text.replace(self._secret, "***")
        return text

    def _describe(self, exc: Exception) -> str:
        status = getattr(exc, "status_code", None)
        head = type(exc).__name__ + (f" (HTTP {status})" if status else "")
        detail = " ".join(str(exc).split())[:300]
        return self._redact(f"{head}: {detail}" if detail else head)

    def _delay(self, attempt: int, exc: Exception) -> float:
        delay = min(self.backoff_max_s, self.backoff_s * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)
        response = getattr(exc, "response", None)
        retry_after = response.headers.get("retry-after") if response is not None else None
        if retry_after:
            try:
                delay = max(delay, min(float(retry_after), self.backoff_max_s))
            except ValueError:
                pass
        return delay

    def _stop(self, reason: str) -> JudgeFatalError:
        with self._fatal_lock:
            if self._fatal is None:
                self._fatal = reason
        return JudgeFatalError(self._fatal)

    def judge(self, item: JudgeItem) -> JudgeResult:
        import openai

        messages: Any = self.prompt.render(item.question, item.answer_a, item.answer_b)
        last_error = "no attempt made"
        last_reply: str | None = None
        parse_failures = 0
        retried: Exception
        for attempt in range(1, self.max_attempts + 1):
            if self._fatal is not None:
                raise JudgeFatalError(self._fatal)
            try:
                response = self._client.chat.completions.create(
                    model=self.model, messages=messages, temperature=0, max_tokens=self.max_tokens
                )
            except (openai.APITimeoutError, openai.APIConnectionError) as exc:
                last_error, retried = self._describe(exc), exc
            except openai.APIStatusError as exc:
                last_error, retried = self._describe(exc), exc
                if exc.status_code in _FATAL_STATUS:
                    raise self._stop(f"the judge API refused the request: {last_error}") from None
                if exc.status_code not in _RETRY_STATUS and exc.status_code < 500:
                    raise JudgeCallError(last_error, attempt) from None
            else:
                reply = (response.choices[0].message.content or "") if response.choices else ""
                try:
                    verdict = parse_verdict(reply)
                except VerdictParseError as exc:
                    parse_failures += 1
                    last_error, last_reply = f"unparseable verdict: {exc}", reply
                    logger.debug("prompt %s: %s (attempt %d)", item.prompt_id, last_error, attempt)
                    if parse_failures > self.parse_retries:
                        raise JudgeCallError(last_error, attempt, self._redact(reply)) from None
                    continue
                usage = response.usage
                return JudgeResult(
                    verdict,
                    self._redact(reply),
                    attempt,
                    usage.prompt_tokens if usage else None,
                    usage.completion_tokens if usage else None,
                )
            if attempt < self.max_attempts:
                delay = self._delay(attempt, retried)
                logger.debug("prompt %s: %s; retrying in %.2fs", item.prompt_id, last_error, delay)
                time.sleep(delay)
        raise JudgeCallError(
            f"gave up after {self.max_attempts} attempts: {last_error}",
            self.max_attempts,
            None if last_reply is None else self._redact(last_reply),
        )

    def estimate_tokens(self, item: JudgeItem) -> tuple[int, int]:
        """About four characters per token, plus a few tokens per message: a planning figure."""
        messages = self.prompt.render(item.question, item.answer_a, item.answer_b)
        return sum(len(m["content"]) // 4 + 4 for m in messages), self.expected_completion_tokens
