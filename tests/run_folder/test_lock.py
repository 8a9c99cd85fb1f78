"""One live run per output folder (`run_folder.lock`): a live holder refuses the next launch with one line; a dead
one (its pid gone on this host, or its heartbeat stale from another host) is taken over; of several launchers
racing for a dead holder's folder exactly one wins."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from spo_align.run_folder import FolderInUse, OutputFolderError, hold
from spo_align.run_folder.layout import LOCK
from spo_align.run_folder.lifecycle import claim_folder
from spo_align.run_folder.lock import _boot_id, _pid_namespace, _process_start
from spo_align.run_folder.recipe_hash import RecipeSettings


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _write_lock(folder: Path, **body) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK
    path.write_text(json.dumps({"token": "theirs", "started": "2026-01-01T00:00:00+00:00", **body}) + "\n")
    return path


def test_a_live_holder_refuses_a_second_launch_with_one_line(tmp_path: Path):
    out = tmp_path / "run"
    with hold(out, command="spo train a.yaml") as lock:
        body = json.loads(lock.path.read_text())
        assert body["host"] == socket.gethostname() and body["pid"] == os.getpid()
        with pytest.raises(FolderInUse) as exc:
            with hold(out):
                pass
        message = str(exc.value)
        assert "\n" not in message and isinstance(exc.value, OutputFolderError)
        assert f"output.dir {out} is in use by another spo-align run (host {socket.gethostname()}, pid {os.getpid()}" in message
        assert "set another output.dir" in message and "SPO_LOCK_STALE_S" in message
        assert json.loads(lock.path.read_text())["token"] == lock.token  # the holder's lock is untouched
    assert not (out / LOCK).exists()  # released when the run ends
    with hold(out):
        pass


def test_the_lock_is_released_when_the_run_fails_and_a_folder_it_created_is_removed_if_empty(tmp_path: Path):
    out = tmp_path / "new"
    with pytest.raises(RuntimeError), hold(out / "deeper" / "run"):
        raise RuntimeError("refused")
    assert not out.exists()
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(RuntimeError), hold(out):
        raise RuntimeError("refused")
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_a_dead_holder_on_this_host_is_taken_over(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    out = tmp_path / "run"
    _write_lock(out, host=socket.gethostname(), pid=_dead_pid(), boot_id=_boot_id(), pid_ns=_pid_namespace())
    caplog.set_level("WARNING", logger="spo_align.run_folder.lock")
    with hold(out) as lock:
        assert json.loads(lock.path.read_text())["token"] == lock.token
    assert any("taking over" in r.getMessage() and "is gone" in r.getMessage() for r in caplog.records)


@pytest.mark.skipif(_process_start(os.getpid()) is None, reason="needs /proc to tell a reused pid")
def test_a_reused_pid_on_this_host_is_not_the_holder(tmp_path: Path):
    out = tmp_path / "run"
    # our own pid, but with another start time: the holder had this pid once and is gone
    _write_lock(out, host=socket.gethostname(), pid=os.getpid(), boot_id=_boot_id(), pid_ns=_pid_namespace(),
                pid_start=_process_start(os.getpid()) - 1)
    with hold(out):
        pass


def test_a_holder_on_another_host_is_refused_until_its_heartbeat_is_stale(tmp_path: Path, monkeypatch):
    out = tmp_path / "run"
    path = _write_lock(out, host="node-elsewhere", pid=1, boot_id="another-boot")
    with pytest.raises(FolderInUse, match="host node-elsewhere, pid 1"):
        with hold(out):
            pass
    monkeypatch.setenv("SPO_LOCK_STALE_S", "60")
    old = time.time() - 61
    os.utime(path, (old, old))  # its node was lost 61 s ago: no heartbeat since
    with hold(out) as lock:
        assert json.loads(lock.path.read_text())["token"] == lock.token


def test_a_pid_of_another_container_on_this_host_is_not_judged_by_this_ones_processes(tmp_path: Path):
    """Same hostname and boot, another pid namespace: its pid means nothing here; only its heartbeat counts."""
    out = tmp_path / "run"
    _write_lock(out, host=socket.gethostname(), pid=_dead_pid(), boot_id=_boot_id(), pid_ns="pid:[1]")
    with pytest.raises(FolderInUse):
        with hold(out):
            pass


def test_the_heartbeat_refreshes_the_lock(tmp_path: Path):
    out = tmp_path / "run"
    with hold(out, heartbeat_s=0.05) as lock:
        old = time.time() - 1000
        os.utime(lock.path, (old, old))
        deadline = time.monotonic() + 10
        while lock.path.stat().st_mtime < time.time() - 100 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert lock.path.stat().st_mtime > time.time() - 100


def test_the_lock_is_no_content_of_the_folder(tmp_path: Path):
    """A folder holding only the live run's lock is a new folder: created, nothing refused or deleted."""
    out = tmp_path / "run"
    settings = RecipeSettings({"stage": "sft"})
    with hold(out) as lock:
        assert claim_folder(out, settings, resume=False, overwrite=False).checkpoint is None
        assert lock.path.exists()
        with pytest.raises(OutputFolderError, match="holds no run to resume"):
            claim_folder(out, settings, resume=True, overwrite=False)


RACER = """
import sys, time
from pathlib import Path
from spo_align.run_folder import FolderInUse, hold
start = float(sys.argv[2])
while time.time() < start:
    time.sleep(0.001)
release = Path(sys.argv[3])
try:
    with hold(Path(sys.argv[1])):
        print("took", flush=True)
        deadline = time.monotonic() + 120
        while not release.exists() and time.monotonic() < deadline:  # held until every racer has tried
            time.sleep(0.01)
except FolderInUse:
    print("refused", flush=True)
"""


def test_of_launchers_racing_for_a_dead_holders_folder_exactly_one_wins(tmp_path: Path):
    out = tmp_path / "run"
    _write_lock(out, host=socket.gethostname(), pid=_dead_pid(), boot_id=_boot_id(), pid_ns=_pid_namespace())
    start = time.time() + 4  # every racer imported and waiting
    release = tmp_path / "release"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RACER, str(out), str(start), str(release)], stdout=subprocess.PIPE, text=True
        )
        for _ in range(4)
    ]
    outputs = [proc.stdout.readline().strip() for proc in procs]  # each racer has tried, the winner still holds
    release.touch()
    for proc in procs:
        proc.communicate(timeout=120)
    assert sorted(outputs) == ["refused", "refused", "refused", "took"], outputs
    assert not (out / LOCK).exists() and list(out.iterdir()) == []


def test_a_launcher_that_judged_a_lock_dead_never_moves_the_live_lock_that_replaced_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """The takeover deletes a dead holder's lock only while it is still there; the lock of a live launcher that took
    the folder meanwhile is never moved, not even for a moment (a lock moved aside and put back left the folder
    without one, and a third launcher took it beside the live one: two runs in one folder, seen in CI)."""
    from spo_align.run_folder.lock import FolderLock, _read

    out = tmp_path / "run"
    path = _write_lock(out, host=socket.gethostname(), pid=_dead_pid(), boot_id=_boot_id(), pid_ns=_pid_namespace())
    judged_dead = _read(path)
    assert judged_dead is not None and judged_dead.dead_because(300.0)
    path.unlink()  # released: a live launcher takes the folder before the late one acts on its judgement
    with hold(out) as live:
        inode = path.stat().st_ino
        moves: list[tuple] = []
        real_rename, real_unlink = os.rename, os.unlink
        monkeypatch.setattr(os, "rename", lambda *a, **k: moves.append(a) or real_rename(*a, **k))
        monkeypatch.setattr(os, "unlink", lambda *a, **k: moves.append(a) or real_unlink(*a, **k))
        FolderLock(out)._take_over(judged_dead, "its pid no longer runs")
        monkeypatch.undo()
        assert [m for m in moves if str(m[0]) == str(path)] == []
        assert path.stat().st_ino == inode and json.loads(path.read_text())["token"] == live.token
        with pytest.raises(FolderInUse):  # and the late launcher is refused
            with hold(out):
                pass
