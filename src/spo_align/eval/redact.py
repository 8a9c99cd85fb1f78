"""Keeping API keys out of everything the judge writes: records, error lines and the log.

Two rules, applied by `redact` to any text before it is stored, shown or logged:

- The keys this process was given (`register_secret`, called by the judge client for the key it
  sends) are masked wherever any `SECRET_WINDOW` consecutive characters of one appear, so a key
  that a server echoes in part, or that straddles a cut, is masked too.
- Anything shaped like a credential is masked whoever it belongs to: provider keys by their
  prefixes (`KEY_PREFIXES`: OpenAI's `sk-`, `sk-proj-`, `sk-svcacct-`, Anthropic's `sk-ant-`,
  OpenRouter's `sk-or-`, Groq's `gsk_`, xAI's `xai-`, ...), `Bearer <token>`, the value of an
  `Authorization`/`api-key`-style header or field, `?api_key=` style query values, JWTs, and the
  userinfo of any URL (`http://user:password@host` is shown `http://***@host`).

Texts are redacted first and cut to length after (`clip`), so a cut never leaves a piece of a key.
`RedactingFilter` applies the same rules to every log record that passes through it.
"""

from __future__ import annotations

import logging
import re
import threading

SECRET_WINDOW = 8
MASK = "***"

# Provider key prefixes, each followed by at least `min` more key characters.
KEY_PREFIXES: tuple[tuple[str, int], ...] = (
    ("sk-", 6), ("sk_", 12), ("gsk_", 16), ("xai-", 16), ("pplx-", 16), ("csk-", 16), ("nvapi-", 16),
    ("fw_", 16), ("r8_", 16), ("tgp_", 16), ("sess-", 16), ("AIza", 20),
)
_KEY_CHARS = r"[A-Za-z0-9_\-]"
_PREFIX_RE = re.compile(
    r"(?<![A-Za-z0-9_\-])(?:"
    + "|".join(f"{re.escape(prefix)}{_KEY_CHARS}{{{least},}}" for prefix, least in KEY_PREFIXES)
    + r"|hf_[A-Za-z]{30,}"  # Hugging Face: hf_ and 34 letters (shorter hf_ words are function names)
    + r"|eyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}(?:\.[A-Za-z0-9_\-]*)?"  # a JWT
    + r")"
)
_TOKEN = r"[^\s\"',;)\]}>]+"
_BEARER_RE = re.compile(rf"(?i)\b(bearer)(\s+){_TOKEN}")
_FIELD_RE = re.compile(
    r"(?i)\b((?:proxy-)?authorization|x-api-key|api[-_]?key|api[-_]?token|access[-_]?token|secret[-_]?key)"
    rf"(\W{{0,3}}[:=]\s*[\"'b]?\s*|\s*[\"']?\s*,\s*b?[\"'])(?:(?:bearer|basic|token)\s+)?{_TOKEN}"
)
_QUERY_RE = re.compile(r"(?i)([?&](?:api[-_]?key|key|token|access[-_]?token)=)[^&\s#\"']+")
# A URL's userinfo (`scheme://user:password@`), up to the authority's last `@` (an unescaped `@` in a password).
_USERINFO_RE = re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://)[^\s/?#\"'<>@]*(?:@[^\s/?#\"'<>@]*)*@")

_secrets: set[str] = set()
_secrets_lock = threading.Lock()


def register_secret(secret: str) -> None:
    """Mask `secret` (and any `SECRET_WINDOW` characters of it) in every text `redact` sees from now on."""
    if secret.strip():
        with _secrets_lock:
            _secrets.add(secret)


def _mask_known(text: str, secret: str) -> str:
    if len(secret) < SECRET_WINDOW:  # too short for pieces to mean anything: whole, standalone copies only
        return re.sub(rf"(?<![A-Za-z0-9]){re.escape(secret)}(?![A-Za-z0-9])", MASK, text)
    covered = bytearray(len(text))
    found = False
    for i in range(len(secret) - SECRET_WINDOW + 1):
        piece = secret[i : i + SECRET_WINDOW]
        at = text.find(piece)
        while at != -1:
            covered[at : at + SECRET_WINDOW] = b"\x01" * SECRET_WINDOW
            found = True
            at = text.find(piece, at + 1)
    if not found:
        return text
    parts, last = [], 0
    for run in re.finditer(rb"\x01+", covered):
        parts += [text[last : run.start()], MASK]
        last = run.end()
    parts.append(text[last:])
    return "".join(parts)


def redact(text: str) -> str:
    """`text` with every registered key (whole or any part of it) and every key-shaped token masked."""
    with _secrets_lock:
        known = sorted(_secrets, key=len, reverse=True)
    for secret in known:
        text = _mask_known(text, secret)
    text = _PREFIX_RE.sub(MASK, text)
    text = _BEARER_RE.sub(rf"\g<1>\g<2>{MASK}", text)
    text = _FIELD_RE.sub(rf"\g<1>\g<2>{MASK}", text)
    text = _USERINFO_RE.sub(rf"\g<1>{MASK}@", text)
    return _QUERY_RE.sub(rf"\g<1>{MASK}", text)


def mask_url(url: str | None) -> str | None:
    """`url` with its userinfo (`user:password@`) masked: how a URL is shown or stored."""
    return None if url is None else _USERINFO_RE.sub(rf"\g<1>{MASK}@", url)


def register_url_credentials(url: str | None) -> None:
    """Mask, from now on, the password of `url` wherever it appears, as written or percent-decoded, and the
    `Basic` credential an HTTP client sends for the URL's user and password (a server may echo either)."""
    import base64
    from urllib.parse import unquote, urlsplit

    if not url:
        return
    try:
        parts = urlsplit(url)
        user, password = parts.username, parts.password
    except ValueError:
        return
    if password:  # the user name alone is no secret (and masking "user" everywhere would mangle replies)
        register_secret(password)
        register_secret(unquote(password))
    if user is not None or password is not None:
        pair = f"{unquote(user or '')}:{unquote(password or '')}"
        register_secret(base64.b64encode(pair.encode()).decode())


def printable(text: str) -> str:
    """`text` as valid UTF-8 can hold it: unpaired surrogates (from a `\\ud800` JSON escape) become U+FFFD."""
    return text.encode("utf-8", "surrogatepass").decode("utf-8", "replace") if not text.isascii() else text


def clip(text: str, limit: int, *, one_line: bool = False) -> str:
    """Redact, then cut to at most `limit` characters (saying how long the whole was)."""
    text = redact(printable(text))
    if one_line:
        text = " ".join(text.split())
    if len(text) <= limit:
        return text
    note = f" […cut, {len(text)} characters in all]"
    return text[: max(0, limit - len(note))] + note


class RedactingFilter(logging.Filter):
    """Redacts each record's message, arguments, traceback and stack text in place; drops nothing."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record: leave it to the handler to report
            return True
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


_FILTER = RedactingFilter()


def redact_loggers(*prefixes: str) -> None:
    """Attach the redacting filter to every existing logger whose name starts with one of `prefixes`
    (a logger's filters see the records it creates, whatever handlers they reach later)."""
    names = [n for n in list(logging.root.manager.loggerDict) if n.startswith(prefixes)]
    for name in names:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)


def redact_handlers(logger: logging.Logger) -> None:
    """Attach the redacting filter to each of `logger`'s handlers (the root's: every propagated record)."""
    for handler in logger.handlers:
        if _FILTER not in handler.filters:
            handler.addFilter(_FILTER)
