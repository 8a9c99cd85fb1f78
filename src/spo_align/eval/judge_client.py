"""A judge behind any OpenAI-compatible chat API (OpenAI, vLLM, llama.cpp, ...), via the `openai` client.

The API key is read from an environment variable (OPENAI_API_KEY by default) and handed to the
client only. It is registered with `redact`, so no part of it reaches a record, an error line or
the log: every text this module passes on is redacted before it is cut to length, and the HTTP
client libraries' loggers get the redacting filter (they log response headers at DEBUG, and a
server may echo the key in one). Retries are ours, not the client's (`max_retries=0`), so each
attempt is counted: 408/409/429, 5xx, timeouts and connection errors back off exponentially with
jitter (honouring a short `Retry-After`); a reply that cannot be read (see `judge_reply`) or whose
verdict cannot be parsed is asked again up to `parse_retries` times, then recorded as an error.
401/403/404 stop the whole run. At most `MAX_REPLY_BYTES` of a reply are read.
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
from spo_align.eval.judge_reply import MAX_REPLY_BYTES, UnreadableReply, read_completion
from spo_align.eval.judge_store import MAX_ERROR_CHARS
from spo_align.eval.records import EvalInputError
from spo_align.eval.redact import clip, mask_url, redact_loggers, register_secret, register_url_credentials

logger = logging.getLogger(__name__)

DEFAULT_KEY_ENV = "OPENAI_API_KEY"
_RETRY_STATUS = frozenset({408, 409, 429})
_FATAL_STATUS = frozenset({401, 403, 404})
_LOCAL_PLACEHOLDER_KEY = "EMPTY"
_LOGGERS_TO_REDACT = ("openai", "httpx", "httpcore", "spo_align")
_ERROR_SOURCE_CHARS = 64 * 1024  # an error text is redacted within this much, then cut to MAX_ERROR_CHARS


class _BodyReadError(Exception):
    """The connection failed or stalled while the reply's body streamed in: retried like a connection error."""


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
        register_url_credentials(base_url)  # the client sends them as `Basic`; a server may echo them
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
            logger.info("%s is not set; sending a placeholder key to %s", api_key_env, mask_url(base_url))
            key = _LOCAL_PLACEHOLDER_KEY
        if key != _LOCAL_PLACEHOLDER_KEY:
            register_secret(key)
        self.timeout_s = timeout_s
        self._fatal: str | None = None
        self._fatal_lock = threading.Lock()
        self._client = openai.OpenAI(api_key=key, base_url=base_url, timeout=timeout_s, max_retries=0)
        redact_loggers(*_LOGGERS_TO_REDACT)  # after the client exists: building it creates httpcore's loggers

    def __repr__(self) -> str:
        return f"OpenAIJudge(model={self.model!r}, base_url={mask_url(self.base_url)!r}, prompt={self.prompt_version!r})"

    def _describe(self, exc: Exception) -> str:
        status = getattr(exc, "status_code", None)
        head = type(exc).__name__ + (f" (HTTP {status})" if status else "")
        detail = str(exc)[:_ERROR_SOURCE_CHARS]  # far beyond the cut, so redacting within it misses nothing kept
        return clip(f"{head}: {detail}" if detail.strip() else head, MAX_ERROR_CHARS, one_line=True)

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

    def _post(self, messages: Any) -> tuple[bytes, str, bool]:
        """The reply's body (at most MAX_REPLY_BYTES), its content type, and whether it was read whole."""
        with self._client.chat.completions.with_streaming_response.create(
            model=self.model, messages=messages, temperature=0, max_tokens=self.max_tokens
        ) as response:
            deadline = time.monotonic() + self.timeout_s  # for the whole body, however it trickles in
            content_type = response.headers.get("content-type", "")
            body = bytearray()
            try:
                for chunk in response.iter_bytes():
                    body += chunk
                    if len(body) > MAX_REPLY_BYTES:
                        return bytes(body[:MAX_REPLY_BYTES]), content_type, False
                    if time.monotonic() > deadline:
                        raise _BodyReadError(f"the reply's body took longer than {self.timeout_s:g}s to arrive")
            except _BodyReadError:
                raise
            except Exception as exc:  # the transport's own error (httpx or httpx2, by openai version)
                raise _BodyReadError(f"{type(exc).__name__} while reading the reply") from exc
        return bytes(body), content_type, True

    def judge(self, item: JudgeItem) -> JudgeResult:
        import openai

        redact_loggers(*_LOGGERS_TO_REDACT)  # loggers of transport modules imported lazily (a proxy) too
        messages: Any = self.prompt.render(item.question, item.answer_a, item.answer_b)
        last_error = "no attempt made"
        last_reply: str | None = None
        parse_failures = 0
        retried: Exception
        for attempt in range(1, self.max_attempts + 1):
            if self._fatal is not None:
                raise JudgeFatalError(self._fatal)
            try:
                body, content_type, complete = self._post(messages)
            except (openai.APITimeoutError, openai.APIConnectionError, _BodyReadError) as exc:
                last_error, retried = self._describe(exc), exc
            except openai.APIStatusError as exc:
                last_error, retried = self._describe(exc), exc
                if exc.status_code in _FATAL_STATUS:
                    raise self._stop(f"the judge API refused the request: {last_error}") from None
                if exc.status_code not in _RETRY_STATUS and exc.status_code < 500:
                    raise JudgeCallError(last_error, attempt) from None
            except openai.APIError as exc:  # the client could not make sense of the exchange
                raise JudgeCallError(self._describe(exc), attempt) from None
            else:
                try:
                    completion = read_completion(body, content_type, complete)
                except UnreadableReply as exc:
                    last_error, last_reply = f"unreadable reply: {exc.reason}", exc.body
                else:
                    try:
                        verdict = parse_verdict(completion.text)
                    except VerdictParseError as exc:
                        last_error, last_reply = f"unparseable verdict: {exc}", completion.text
                    else:
                        return JudgeResult(verdict, completion.text, attempt, completion.prompt_tokens,
                                           completion.completion_tokens)
                parse_failures += 1
                last_error = clip(last_error, MAX_ERROR_CHARS, one_line=True)
                logger.debug("prompt %s: %s (attempt %d)", item.prompt_id, last_error, attempt)
                if parse_failures > self.parse_retries:
                    raise JudgeCallError(last_error, attempt, last_reply) from None
                continue
            if attempt < self.max_attempts:
                delay = self._delay(attempt, retried)
                logger.debug("prompt %s: %s; retrying in %.2fs", item.prompt_id, last_error, delay)
                time.sleep(delay)
        raise JudgeCallError(f"gave up after {self.max_attempts} attempts: {last_error}", self.max_attempts, last_reply)

    def estimate_tokens(self, item: JudgeItem) -> tuple[int, int]:
        """About four characters per token, plus a few tokens per message: a planning figure."""
        messages = self.prompt.render(item.question, item.answer_a, item.answer_b)
        return sum(len(m["content"]) // 4 + 4 for m in messages), self.expected_completion_tokens
