"""`spo`'s side of a launched run's stop (train/stopping.py), with real processes and real signals: a shell stands
for the launcher, a small Python program for a rank that announces itself the way `SaveOnSigterm` does."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from spo_align.train import stopping
from spo_align.train.stopping import run_launcher, running

RANK = """
import os, signal, sys, time
from pathlib import Path
got = []
signal.signal(signal.SIGTERM, lambda *a: got.append(1))
(Path(os.environ["SPO_STOP_DIR"]) / f"rank-{os.getpid()}").write_text("0")
Path(sys.argv[1]).write_text("ready")
deadline = time.monotonic() + 20
while not got and time.monotonic() < deadline:
    time.sleep(0.05)
time.sleep(1.0)  # a second SIGTERM, if any were sent, arrives meanwhile
Path(sys.argv[1]).write_text(str(len(got)))
"""


def _sigterm_self_when(condition, timeout: float = 20.0) -> threading.Thread:
    def later() -> None:
        deadline = time.monotonic() + timeout
        while not condition() and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=later, daemon=True)
    thread.start()
    return thread


def _notice(saving: bool) -> str:
    return f"test notice (saving={saving})"


def test_a_sigterm_reaches_each_ready_rank_once_and_not_the_launcher(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    state = tmp_path / "rank-state"
    launcher = ["sh", "-c", f'"{sys.executable}" -c "$0" "$1"; exit $?', RANK, str(state)]
    _sigterm_self_when(lambda: state.exists() and state.read_text() == "ready")
    with caplog.at_level("WARNING"):
        outcome = run_launcher(launcher, _notice)
    assert outcome.told_to_stop and outcome.returncode == 0  # the shell was never signalled: it ended as its rank did
    assert state.read_text() == "1"  # exactly one SIGTERM reached the rank
    assert "test notice (saving=True)" in caplog.text


def test_a_sigterm_with_no_rank_ready_stops_the_whole_launch_at_once(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    pid_file = tmp_path / "child"
    launcher = ["sh", "-c", f'sleep 60 & echo $! > "{pid_file}"; wait']
    _sigterm_self_when(pid_file.exists)
    started = time.monotonic()
    with caplog.at_level("WARNING"):
        outcome = run_launcher(launcher, _notice)
    assert time.monotonic() - started < 15
    assert outcome.told_to_stop and outcome.returncode == -signal.SIGTERM
    assert not running(int(pid_file.read_text()))  # the launcher's child went with it
    assert "test notice (saving=False)" in caplog.text


def test_spo_waits_for_what_the_launcher_leaves_running(tmp_path: Path):
    pid_file = tmp_path / "child"
    started = time.monotonic()
    outcome = run_launcher(["sh", "-c", f'sleep 1.5 & echo $! > "{pid_file}"; exit 0'], _notice)
    assert outcome.returncode == 0 and not outcome.told_to_stop
    assert time.monotonic() - started >= 1.4 and not running(int(pid_file.read_text()))


def test_what_outlives_the_launcher_too_long_is_killed_and_gone_when_spo_returns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(stopping, "LINGER_S", 0.5)
    pid_file = tmp_path / "children"
    started = time.monotonic()
    run_launcher(["sh", "-c", f'for i in 1 2 3 4 5 6 7 8; do sleep 60 & echo $! >> "{pid_file}"; done; exit 0'], _notice)
    pids = [int(line) for line in pid_file.read_text().split()]
    assert len(pids) == 8 and time.monotonic() - started < 20
    assert [pid for pid in pids if running(pid)] == []  # killed, and their end awaited, not merely signalled


def test_waiting_for_killed_processes_ends_when_they_are_gone_or_after_its_bound(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
):
    child = subprocess.Popen(["sleep", "60"])
    threading.Timer(0.3, child.kill).start()  # the kill lands while spo already waits
    stopping._wait_until_gone([child.pid])
    assert not running(child.pid)
    child.wait()

    monkeypatch.setattr(stopping, "KILLED_S", 0.3)
    stubborn = subprocess.Popen(["sleep", "60"])
    try:
        with caplog.at_level("WARNING"):
            stopping._wait_until_gone([stubborn.pid])  # never killed: the wait gives up at its bound
        assert running(stubborn.pid) and f"[{stubborn.pid}]" in caplog.text
    finally:
        stubborn.kill()
        stubborn.wait()


def test_a_missing_launcher_leaves_no_stop_folder_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    with pytest.raises(FileNotFoundError):
        run_launcher(["no-such-launcher-spo-test"], _notice)
    assert list(tmp_path.iterdir()) == []


@contextmanager
def _sigint(handler) -> Iterator[None]:
    """SIGINT's disposition set to `handler` while the block runs, restored after."""
    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_ctrl_c_goes_to_the_launch_and_is_raised_once_the_launch_has_ended(tmp_path: Path):
    pid_file = tmp_path / "child"
    started = time.monotonic()
    with _sigint(signal.default_int_handler), pytest.raises(KeyboardInterrupt):
        # the launcher's group got the SIGINT: its `sleep 60` ended with it
        run_launcher(["sh", "-c", f'echo $$ > "{pid_file}"; kill -INT $PPID; exec sleep 60'], _notice)
    assert time.monotonic() - started < 30 and not running(int(pid_file.read_text()))


def test_a_sigint_ignored_by_whoever_started_spo_stays_ignored(tmp_path: Path):
    """`nohup`, or a background job of a shell without job control: no Ctrl-C is meant for this run."""
    with _sigint(signal.SIG_IGN):
        outcome = run_launcher(["sh", "-c", "kill -INT $PPID; sleep 0.5; exit 3"], _notice)
        assert outcome.returncode == 3 and not outcome.told_to_stop
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
