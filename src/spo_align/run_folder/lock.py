"""One live run per output folder: a lock file that works across processes and across the nodes of a shared
filesystem, and that a dead holder does not keep.

The lock is `output.dir/.spo-lock`, created with `O_CREAT | O_EXCL` (atomic on local filesystems and on NFS v3+)
by the process that claims the folder: `spo train` in-process, or the launching parent of a torchrun /
accelerate / deepspeed run (its ranks never take it, and a second node of a multi-node launch leaves it to the
first). It holds the holder's host, pid, the boot and start time of that pid, when it started, the command and a
random token. While the run lives a thread refreshes the file's mtime every `HEARTBEAT_S` seconds (the
heartbeat); the lock is deleted when the run ends in any way Python sees (finished, refused, failed, stopped).

A second launch is refused with one line naming the holder, unless the holder is provably gone:
- on the same host (same boot and pid namespace), its pid no longer runs, or runs another program started later
  (pid reused);
- on any host, its heartbeat is older than `stale_seconds()` (`SPO_LOCK_STALE_S`, default 300 s): a node lost
  with its process, whose pid cannot be asked about.
A dead holder's lock is judged again and deleted under a kernel lock on the output folder (`flock` on the folder
itself, released by the kernel if the process dies), and only if it still carries the token judged dead: the
launchers that found it dead then race for the one `O_EXCL` create, so exactly one takes the folder. (A lock
moved aside and put back, as before, left a moment without any lock, in which a third launcher took the folder
beside the first.) Where the filesystem refuses `flock` on a folder (some network filesystems), the takeover runs
unguarded and a race between launchers that find the same dead holder within milliseconds is not excluded.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spo_align.os_errors import reason
from spo_align.run_folder.layout import LOCK
from spo_align.run_folder.lifecycle import OutputFolderError

logger = logging.getLogger(__name__)

HEARTBEAT_S = 30.0
STALE_ENV = "SPO_LOCK_STALE_S"
DEFAULT_STALE_S = 300.0


class FolderInUse(OutputFolderError):
    """Another live run holds the output folder (the message is the one line to show)."""


def stale_seconds() -> float:
    """How old a holder's heartbeat must be before its lock is taken over (`SPO_LOCK_STALE_S`, default 300)."""
    raw = os.environ.get(STALE_ENV)
    try:
        value = float(raw) if raw else DEFAULT_STALE_S
    except ValueError:
        value = DEFAULT_STALE_S
    return value if value > 0 else DEFAULT_STALE_S


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text(encoding="ascii").strip()
    except OSError:
        return None


def _pid_namespace() -> str | None:
    """This process's pid namespace (two containers on one host, even with one hostname, differ here)."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _process_start(pid: int) -> int | None:
    """The start time of process `pid` in clock ticks since boot (Linux), or None where it cannot be read."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _pid_runs(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # it exists (owned by someone else)
    return True


@dataclass(frozen=True)
class Holder:
    """What a lock file says about the run holding the folder."""

    body: dict[str, Any]
    age_s: float | None
    """Seconds since the last heartbeat (the file's mtime), None when the file vanished."""

    def describe(self) -> str:
        host, pid = self.body.get("host", "?"), self.body.get("pid", "?")
        since = self.body.get("started", "an unknown time")
        beat = f"{self.age_s:.0f} s ago" if self.age_s is not None else "unknown"
        return f"host {host}, pid {pid}, since {since}, last heartbeat {beat}"

    def dead_because(self, stale_s: float) -> str | None:
        """Why the holder is certainly gone, or None when it may still be running."""
        body = self.body
        same_host = body.get("host") == socket.gethostname() and body.get("pid_ns") == _pid_namespace()
        pid = body.get("pid")
        if same_host and isinstance(pid, int) and body.get("boot_id") == _boot_id() and _boot_id() is not None:
            if not _pid_runs(pid):
                return f"its process {pid} on this host is gone"
            started = body.get("pid_start")
            now_start = _process_start(pid)
            if isinstance(started, int) and now_start is not None and now_start != started:
                return f"pid {pid} on this host is now another process"
            return None
        if same_host and isinstance(pid, int) and body.get("boot_id") not in (None, _boot_id()):
            return "this host was restarted since it started"
        if self.age_s is not None and self.age_s > stale_s:
            return f"its heartbeat is {self.age_s:.0f} s old (stale after {stale_s:.0f} s)"
        return None


def _read(path: Path) -> Holder | None:
    try:
        age = time.time() - path.stat().st_mtime
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    try:
        body = json.loads(text) if text.strip() else {}
    except ValueError:
        body = {}
    return Holder(body if isinstance(body, dict) else {}, max(age, 0.0))


class FolderLock:
    """The lock on one output folder, held by this process; `release` (or the context manager) lets it go."""

    def __init__(self, output_dir: Path, *, command: str = "", heartbeat_s: float = HEARTBEAT_S):
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / LOCK
        self.command = command
        self.heartbeat_s = heartbeat_s
        self.token = secrets.token_hex(8)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.created: list[Path] = []

    def _body(self) -> dict[str, Any]:
        from spo_align.run_folder.run_info import now

        return {
            "host": socket.gethostname(), "pid": os.getpid(), "pid_start": _process_start(os.getpid()),
            "boot_id": _boot_id(), "pid_ns": _pid_namespace(), "started": now(), "command": self.command, "token": self.token,
            "heartbeat_s": self.heartbeat_s,
        }

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        try:
            os.write(fd, (json.dumps(self._body()) + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        return True

    @contextmanager
    def _takeover_guard(self) -> Iterator[None]:
        """Exclusive among launchers of this folder while held: `flock` on the folder (see the module)."""
        try:
            fd = os.open(self.output_dir, os.O_RDONLY)
        except OSError:
            yield
            return
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError as exc:
                logger.debug("no flock on %s (%s): taking over unguarded", self.output_dir, reason(exc))
            yield
        finally:
            os.close(fd)  # releases the flock

    def _take_over(self, holder: Holder, why: str) -> None:
        """Delete a dead holder's lock if it is still the one judged dead (under the guard: no launcher can replace
        it meanwhile, since a lock is only created where none is and only deleted by its owner or here)."""
        with self._takeover_guard():
            current = _read(self.path)
            if current is None or current.body.get("token") != holder.body.get("token"):
                return  # gone, or already replaced by a live launcher: the create decides
            try:
                self.path.unlink()
            except FileNotFoundError:
                return
        logger.warning("taking over %s from a run that is gone (%s; %s)", self.output_dir, holder.describe(), why)

    def acquire(self) -> FolderLock:
        """Take the lock or raise `FolderInUse` (one line: who holds it, since when, what to do)."""
        if self.output_dir.exists() and not self.output_dir.is_dir():
            raise OutputFolderError(f"output.dir {self.output_dir} exists and is not a folder")
        if not self.output_dir.exists():
            missing = [self.output_dir, *(p for p in self.output_dir.parents if not p.exists())]
            try:
                self.output_dir.mkdir(parents=True)
                self.created = missing  # leaf first: removed again, if still empty, when the run is refused
            except FileExistsError:
                pass
            except OSError as exc:
                raise OutputFolderError(f"output.dir {self.output_dir} cannot be created: {reason(exc)}") from None
        stale_s = stale_seconds()
        for _ in range(5):
            try:
                if self._create():
                    self._start_heartbeat()
                    return self
            except OSError as exc:
                raise OutputFolderError(f"output.dir {self.output_dir} is not writable: {reason(exc)}") from None
            holder = _read(self.path)
            if holder is None:
                continue  # released between our two looks
            if holder.body.get("token") is None and holder.age_s is not None and holder.age_s < stale_s:
                time.sleep(0.2)  # being written by a launcher that has just created it
                holder = _read(self.path)
                if holder is None:
                    continue
            why = holder.dead_because(stale_s)
            if why is None:
                raise FolderInUse(
                    f"output.dir {self.output_dir} is in use by another spo-align run ({holder.describe()}); wait "
                    f"for it to end or stop it, or set another output.dir; if that run is dead on another machine, "
                    f"its lock {self.path} is taken over once its heartbeat is {stale_s:.0f} s old "
                    f"({STALE_ENV}), or delete that file"
                )
            self._take_over(holder, why)
        raise FolderInUse(f"output.dir {self.output_dir}: could not take its lock {self.path} (other launchers race for it)")

    def _start_heartbeat(self) -> None:
        def beat() -> None:
            while not self._stop.wait(self.heartbeat_s):
                try:
                    os.utime(self.path)
                except OSError as exc:  # a lost file or mount: the next launcher may take over; say so once
                    logger.warning("cannot refresh the lock %s: %s", self.path, reason(exc))
                    return

        self._thread = threading.Thread(target=beat, name="spo-lock-heartbeat", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Stop the heartbeat and delete the lock if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        holder = _read(self.path)
        if holder is not None and holder.body.get("token") == self.token:
            self.path.unlink(missing_ok=True)

    def remove_created_folder(self) -> None:
        """Remove the output folder (and the parents created for it) again if this lock created them and nothing
        else was written there."""
        for folder in self.created:
            try:
                folder.rmdir()
            except OSError:
                return


@contextmanager
def hold(output_dir: Path, *, command: str = "", heartbeat_s: float = HEARTBEAT_S) -> Iterator[FolderLock]:
    """Hold the lock on `output_dir` for the duration (see the module); raises `FolderInUse` when it is taken."""
    lock = FolderLock(output_dir, command=command, heartbeat_s=heartbeat_s).acquire()
    try:
        yield lock
    except BaseException:
        lock.release()
        lock.remove_created_folder()
        raise
    lock.release()
