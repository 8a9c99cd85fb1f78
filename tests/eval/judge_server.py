"""The local OpenAI-compatible judge server that misbehaves on purpose, and a writer of generation files:
shared by the evaluation tests (imported as a module, not through conftest, so that the import never depends on
which conftest pytest loaded last)."""

from __future__ import annotations

import json
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path

_ANSWER_RE = re.compile(
    r"\[User Question\]\n(?P<q>.*?)\n\n\[The Start of Assistant A's Answer\]\n(?P<a>.*?)\n"
    r"\[The End of Assistant A's Answer\]\n\n\[The Start of Assistant B's Answer\]\n(?P<b>.*?)\n"
    r"\[The End of Assistant B's Answer\]",
    re.DOTALL,
)



@dataclass
class FakeJudgeServer:
    """Answers /v1/chat/completions like a judge that prefers the longer answer (equal length: tie).

    Faults are chosen by words in the question, per (question, answer A, answer B):
    `rate` 429 twice, `crash` 500 once, `slow` sleeps past the client timeout once, `garbled`
    one reply without a verdict, `hopeless` never a verdict, `down` always 503, `biased` always
    [[A]] (so the verdict flips with the order), `leak` a 400 whose body echoes the Authorization
    header. Requests without `Bearer <expected_key>` (or `Basic <basic_auth>` when set) get 401, whose body
    echoes what was sent.

    With `echo_key`, the server also hands the key back in every place it can: response headers
    (including `x-request-id`, which the client logs), every error body, and the text of replies;
    `leak at N` answers 400 with N dots and then copies of the key back to back (so a cut of the
    message to a fixed length splits one), and `echo huge` returns a reply many times longer than
    the stored cap, made of copies of the key, before its verdict.

    Malformed replies (every attempt, HTTP 200 unless said): `html page` an HTML page, `not json`
    broken JSON, `null content`, `parts content` (a list of content parts), `number content`,
    `no choices`, `no message`, `array body`, `error body` (an error object with status 200),
    `bad utf8` (bytes that are not UTF-8), `huge body` (more than 1 MiB), `lone surrogate` (a
    verdict after an unpaired surrogate escape: readable), `odd usage` (token counts as strings:
    readable, the counts are dropped).
    """

    expected_key: str
    slow_s: float = 5.0  # far beyond any client timeout the tests set
    delay_s: float = 0.0
    attempts: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    verdicts_served: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    requested: list[tuple[str, str, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    url: str = ""
    echo_key: bool = False
    basic_auth: str | None = None
    """Also accept `Authorization: Basic <basic_auth>` (what a client sends for user:password in the URL)."""

    def _echo_headers(self, headers: dict[str, str]) -> dict[str, str]:
        if not self.echo_key:
            return {}
        sent = headers.get("authorization", "")
        return {"x-request-id": sent, "x-echo-authorization": sent, "openai-organization": sent.removeprefix("Bearer ")}

    def reply(self, headers: dict[str, str], body: dict) -> tuple[int, dict | bytes, dict[str, str]]:
        status, payload, extra = self._reply(headers, body)
        return status, payload, {**self._echo_headers(headers), **extra}

    def _reply(self, headers: dict[str, str], body: dict) -> tuple[int, dict | bytes, dict[str, str]]:
        sent = headers.get("authorization")
        basic = self.basic_auth is not None and sent == f"Basic {self.basic_auth}"
        if sent != f"Bearer {self.expected_key}" and not basic:
            return 401, {"error": {"message": f"bad key: {sent}", "type": "invalid_request_error"}}, {}
        user = next(m["content"] for m in body["messages"] if m["role"] == "user")
        match = _ANSWER_RE.search(user)
        assert match, "unexpected prompt shape"
        q, a, b = match["q"], match["a"], match["b"]
        key = (q, a, b)
        with self.lock:
            self.attempts[key] += 1
            n = self.attempts[key]
            self.requested.append(key)
        leak_at = re.search(r"leak at (\d+)", q)
        if leak_at:
            copies = f"z{self.expected_key}" * 60  # wherever a cut falls, it splits a copy of the key
            return 400, {"error": {"message": "." * int(leak_at[1]) + copies}}, {}
        if "leak" in q:
            return 400, {"error": {"message": f"cannot use {sent}"}}, {}
        malformed = self._malformed(q, body["model"])
        if malformed is not None:
            return 200, malformed[1], {"content-type": malformed[0]}
        if "rate" in q and n <= 2:
            return 429, {"error": {"message": "slow down"}}, {"retry-after": "0"}
        if "crash" in q and n == 1:
            return 500, {"error": {"message": "boom" + (f" for {sent}" if self.echo_key else "")}}, {}
        if "down" in q:
            return 503, {"error": {"message": "overloaded"}}, {}
        if "slow" in q and n == 1:
            time.sleep(self.slow_s)
        if self.delay_s:
            time.sleep(self.delay_s)
        if "hopeless" in q or ("garbled" in q and n == 1):
            text = "Both answers have merit. Verdict: A"
        else:
            if "biased" in q:
                verdict = "A"
            else:
                verdict = "A" if len(a) > len(b) else "B" if len(b) > len(a) else "C"
            text = f"Reason: compared lengths.\n[[{verdict}]]"
            if "echo huge" in q:
                text = f"{'z' * 20}{self.expected_key}" * 600 + "\n" + text  # copies of the key across any cut
            elif self.echo_key:
                text = f"You sent {sent}; key {self.expected_key}.\n" + text
            if "lone surrogate" in q:
                text = "odd \ud800 text\n" + text
            with self.lock:
                self.verdicts_served[key] += 1
        completion = {
            "id": "cmpl-1",
            "object": "chat.completion",
            "created": 0,
            "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": len(user) // 4, "completion_tokens": 7, "total_tokens": len(user) // 4 + 7},
        }
        if "odd usage" in q:
            completion["usage"] = {"prompt_tokens": "many", "completion_tokens": None}
        return 200, completion, {}

    @staticmethod
    def _malformed(q: str, model: str) -> tuple[str, bytes] | None:
        """A 200 reply that is not a readable chat completion, chosen by a phrase in the question."""
        def completion(message: object, **extra: object) -> bytes:
            choice = {"index": 0, "finish_reason": "stop", **({} if message is None else {"message": message})}
            return json.dumps({"id": "c", "object": "chat.completion", "model": model, "choices": [choice], **extra}).encode()

        json_type = "application/json"
        shapes: dict[str, tuple[str, bytes]] = {
            "html page": ("text/html", b"<!DOCTYPE html><html><body><h1>502 Bad Gateway</h1></body></html>"),
            "not json": (json_type, b'{"choices": [{"message": '),
            "null content": (json_type, completion({"role": "assistant", "content": None})),
            "parts content": (json_type, completion({"role": "assistant", "content": [{"type": "text", "text": "[[A]]"}]})),
            "number content": (json_type, completion({"role": "assistant", "content": 7})),
            "no choices": (json_type, json.dumps({"id": "c", "object": "chat.completion", "choices": []}).encode()),
            "no message": (json_type, completion(None)),
            "array body": (json_type, b"[1, 2, 3]"),
            "error body": (json_type, json.dumps({"error": {"message": "model overloaded", "code": 503}}).encode()),
            "bad utf8": (json_type, b'{"choices": [{"message": {"content": "\xff\xfe [[A]]"}}]}'),
            "huge body": (json_type, completion({"role": "assistant", "content": "w" * (2 << 20) + " [[A]]"})),
        }
        return next((shape for phrase, shape in shapes.items() if phrase in q), None)


def _handler(server_state: FakeJudgeServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:  # keep test output clean
            pass

        def do_POST(self) -> None:
            if self.path.rstrip("/") != "/v1/chat/completions":
                self.send_error(404)
                return
            body = json.loads(self.rfile.read(int(self.headers["content-length"])))
            headers = {k.lower(): v for k, v in self.headers.items()}
            status, payload, extra = server_state.reply(headers, body)
            data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
            extra = {"content-type": "application/json", **extra}
            try:
                self.send_response(status)
                self.send_header("content-length", str(len(data)))
                for k, v in extra.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up (timeout); that is the point of `slow`

    return Handler



def write_generations(gen_dir: Path, answers: dict[str, dict[str, str]], questions: dict[str, str],
                      references: dict[str, str] | None = None) -> Path:
    """Hand-made generation files: answers[model][prompt_id]."""
    from spo_align.eval.records import GenerationRecord, write_generation_file

    for model, by_prompt in answers.items():
        write_generation_file(
            gen_dir / f"{model}.jsonl",
            [
                GenerationRecord(model, pid, questions[pid], text, (references or {}).get(pid), {"max_new_tokens": 8})
                for pid, text in by_prompt.items()
            ],
        )
    return gen_dir
