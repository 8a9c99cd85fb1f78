"""A stop on request (SIGTERM) in a launched run: how the signal reaches every rank, and what `spo` says of it.

In-process runs handle the signal in the process itself (`preemption.SaveOnSigterm`). A launched run's ranks are
started by a launcher that `spo train` starts, and the launchers answer a SIGTERM in ways that lose the run
(DeepSpeed 0.19, torch 2.13; read in their installed source):

- `deepspeed` on one node: its runner installs a SIGTERM handler only for a multi-node pdsh launch
  (`deepspeed/launcher/runner.py:621-634`); a SIGTERM ends the runner alone and its node launcher
  (`deepspeed/launcher/launch.py`) and ranks train on, orphaned.
- DeepSpeed's node launcher (`launch.py:121-132, 251-270`) answers a SIGTERM with a SIGTERM to every rank's
  process tree, one rank after another, and a SIGKILL to whatever still runs 30 s later.
- `torchrun` / `accelerate launch` (`torch/distributed/elastic/agent/server/api.py:752-754`,
  `multiprocessing/api.py:1023-1053`) pass the signal to each rank's own session (`subprocess_handler.py:66,85`)
  and SIGKILL it after `--shutdown-timeout` (`TORCH_ELASTIC_SHUTDOWN_TIMEOUT`, default 30 s).

So `spo train` starts the launcher in a session of its own and keeps SIGTERM for itself. A rank that can save on
request (training has begun: `SaveOnSigterm` is installed) writes its pid into the folder named by `SPO_STOP_DIR`
and withdraws it when training ends. On the first SIGTERM `spo` sends one SIGTERM to each of those ranks and none
to the launcher: the ranks agree at the end of the step (an all-reduce), save one checkpoint together and exit 0,
and the launcher, seeing its ranks succeed, ends without a deadline of its own. Rank 0 records the step it stopped
at (`stopped.json`), so that `spo` names the checkpoint really written. With no rank ready (before training:
loading, tokenizing; after it: the final save) there is nothing a checkpoint could hold yet, and the whole launch
(the launcher's process group, and through the launcher its ranks) is signalled: everything stops now. A second
SIGTERM does that too. SIGINT (Ctrl-C) and SIGHUP go to the launcher's process group, as the terminal would have
sent them. When the launcher has ended, `spo` waits for every process it started to end too (a minute at most,
then they are killed), so that nothing of the launch outlives it.

The line printed on a SIGTERM says whether the checkpoint should fit in the time before SIGKILL: its size (the
newest sealed checkpoint's, else an estimate from the parameter count), the write speed measured at that
checkpoint's save (else an assumed 100 MB/s), the last step's duration, and the grace the user states in
`SPO_STOP_GRACE_S` (no launcher adds one: it is not signalled). This module imports neither torch nor transformers.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

STOP_DIR_ENV = "SPO_STOP_DIR"
GRACE_ENV = "SPO_STOP_GRACE_S"
STOP_RECORD = "stopped.json"
ASSUMED_BYTES_PER_S = 100e6
"""Write speed assumed before a checkpoint of the run was measured (a network volume's order; local NVMe is
faster)."""
LINGER_S = 60.0
"""How long the processes of a launch may outlive the launcher before they are killed (DeepSpeed's node launcher
kills its ranks 30 s after a SIGTERM)."""
OPTIMIZER_BYTES_PER_PARAM = 12
"""Adam's fp32 state per trainable parameter under mixed precision: a master copy and two moments."""


# ---------------------------------------------------------------- the ranks' side


def announce_rank() -> Path | None:
    """Tell the `spo` process that this rank saves on SIGTERM now (a no-op outside a launched run)."""
    folder = os.environ.get(STOP_DIR_ENV)
    if not folder or not Path(folder).is_dir():
        return None
    path = Path(folder) / f"rank-{os.getpid()}"
    path.write_text(os.environ.get("RANK", "0"), encoding="utf-8")
    return path


def withdraw_rank(path: Path | None) -> None:
    if path is not None:
        path.unlink(missing_ok=True)


def record_stop(step: int, checkpoint: str) -> None:
    """Rank 0: the step the ranks stopped at and the checkpoint they saved there (read by `spo`)."""
    folder = os.environ.get(STOP_DIR_ENV)
    if not folder or not Path(folder).is_dir():
        return
    tmp = Path(folder) / f".{STOP_RECORD}.tmp"
    tmp.write_text(json.dumps({"step": step, "checkpoint": checkpoint}), encoding="utf-8")
    os.replace(tmp, Path(folder) / STOP_RECORD)


# ---------------------------------------------------------------- the `spo` process's side


def running(pid: int) -> bool:
    """True while process `pid` runs (a zombie has ended)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except FileNotFoundError:
        return False
    except (OSError, IndexError):  # no /proc: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


def ready_ranks(folder: Path) -> list[int]:
    """The pids of the ranks that save on SIGTERM now."""
    pids = []
    for path in Path(folder).glob("rank-*"):
        try:
            pid = int(path.name.removeprefix("rank-"))
        except ValueError:
            continue
        if running(pid):
            pids.append(pid)
    return sorted(pids)


def _send(pid: int, signum: int, *, group: bool = False) -> None:
    try:
        (os.killpg if group else os.kill)(pid, signum)
    except (ProcessLookupError, PermissionError):
        pass


@dataclass(frozen=True)
class LaunchOutcome:
    """How a launch ended: the launcher's exit code, whether `spo` was told to stop (SIGTERM), and the step and
    checkpoint rank 0 recorded when the ranks stopped on it (None when they did not get to save)."""

    returncode: int
    told_to_stop: bool
    stopped_at: tuple[int, str] | None


class _Forwarder:
    """The signal handlers `spo` holds while its launcher runs (see the module doc). Installed before the launcher
    starts: a signal that comes before it has started is passed on as soon as it has."""

    def __init__(self, folder: Path, notice: Callable[[bool], str]):
        self.folder, self.notice = folder, notice
        self.proc: subprocess.Popen | None = None
        self.terms = 0
        self.other: int | None = None

    def started(self, proc: subprocess.Popen) -> None:
        self.proc = proc
        if self.terms:  # no rank can be ready yet
            self._say(False)
            _send(proc.pid, signal.SIGTERM, group=True)
        if self.other is not None:
            _send(proc.pid, self.other, group=True)

    def _say(self, saving: bool) -> None:
        try:
            logger.warning("%s", self.notice(saving))
        except Exception as exc:  # the notice only informs: it must never cost the stop itself
            logger.warning("SIGTERM: %s (no estimate: %s)", "saving a checkpoint, then stopping" if saving else "stopping now", exc)

    def on_sigterm(self, signum: int, frame: Any) -> None:
        self.terms += 1
        if self.proc is None:
            return
        ranks = ready_ranks(self.folder)
        if self.terms == 1 and ranks:
            self._say(True)
            for pid in ranks:
                _send(pid, signal.SIGTERM)
            return
        if self.terms == 1:
            self._say(False)
        else:
            logger.warning("SIGTERM again: stopping every rank now")
        _send(self.proc.pid, signal.SIGTERM, group=True)
        for pid in ranks:  # ranks in sessions of their own (torchrun's) are not in the launcher's group
            _send(pid, signal.SIGTERM)

    def on_other(self, signum: int, frame: Any) -> None:
        self.other = signum
        if self.proc is not None:
            _send(self.proc.pid, signum, group=True)


def run_launcher(command: Sequence[str], notice: Callable[[bool], str]) -> LaunchOutcome:
    """Run the launcher to its end in a session of its own, passing signals on as the module doc says.

    `notice(saving)` gives the line logged on the first SIGTERM: `saving` is True when ranks are ready to save.
    A SIGINT received meanwhile is raised as KeyboardInterrupt once the launcher has ended; a SIGHUP ends this
    process the default way then. Raises FileNotFoundError when the launcher is not found."""
    folder = Path(tempfile.mkdtemp(prefix="spo-stop-"))
    forwarder = _Forwarder(folder, notice)
    previous: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, forwarder.on_sigterm)
        for signum in (signal.SIGINT, signal.SIGHUP):
            if signal.getsignal(signum) is not signal.SIG_IGN:  # `nohup`, a background job: left ignored
                previous[signum] = signal.signal(signum, forwarder.on_other)
    try:
        proc = subprocess.Popen(list(command), env={**os.environ, STOP_DIR_ENV: str(folder)}, start_new_session=True)
        forwarder.started(proc)
        returncode = proc.wait()
        _wait_for_the_rest(proc.pid, folder)
        stopped_at = _read_record(folder / STOP_RECORD)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for path in folder.iterdir():
            path.unlink(missing_ok=True)
        folder.rmdir()
    if forwarder.other == signal.SIGINT:
        raise KeyboardInterrupt
    if forwarder.other == signal.SIGHUP:
        os.kill(os.getpid(), signal.SIGHUP)
    return LaunchOutcome(returncode, forwarder.terms > 0, stopped_at)


def _group_members(pgid: int) -> list[int]:
    """The running processes of process group `pgid` (zombies excluded)."""
    members = []
    try:
        entries = os.listdir("/proc")
    except OSError:  # no /proc: the kernel says whether any member (a zombie included) is left
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return []
        return [pgid]
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            members.append(int(entry))
    return members


def _left_after(find: Callable[[], list[int]], seconds: float, poll_s: float) -> list[int]:
    """Poll `find` (the pids still running) until it finds none or `seconds` have passed; what is left then."""
    deadline = time.monotonic() + seconds
    while (left := find()) and time.monotonic() <= deadline:
        time.sleep(poll_s)
    return left


def _wait_for_the_rest(pgid: int, folder: Path) -> None:
    """After the launcher's own exit, wait for whatever it started (its node launcher, ranks in its group, ranks
    in sessions of their own) to end, at most LINGER_S, then SIGKILL what is left: a launcher that exits before its
    ranks (DeepSpeed's runner on a SIGINT) must not leave them running."""
    left = _left_after(lambda: sorted(set(_group_members(pgid)) | set(ready_ranks(folder))), LINGER_S, 0.2)
    if not left:
        return
    logger.warning("processes %s of the launch still run %.0f s after the launcher ended: killing them", left, LINGER_S)
    _send(pgid, signal.SIGKILL, group=True)
    for pid in left:
        _send(pid, signal.SIGKILL)
    _wait_until_gone(left)


KILLED_S = 10.0
"""How long `spo` waits for SIGKILLed processes to be gone (a kill is delivered when the process is next
scheduled, and a rank in uninterruptible I/O ends only when that I/O returns)."""


def _wait_until_gone(pids: Sequence[int]) -> None:
    """Return once none of `pids` runs (their memory, a GPU's included, is free again), at most KILLED_S."""
    left = _left_after(lambda: [pid for pid in pids if running(pid)], KILLED_S, 0.02)
    if left:
        logger.warning("processes %s of the launch still run %.0f s after SIGKILL", left, KILLED_S)


def _read_record(path: Path) -> tuple[int, str] | None:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        return int(record["step"]), str(record["checkpoint"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


# ---------------------------------------------------------------- will the checkpoint fit in time?


def grace_seconds() -> float | None:
    """The seconds between SIGTERM and SIGKILL the user states in SPO_STOP_GRACE_S (None when unset or unreadable)."""
    raw = os.environ.get(GRACE_ENV, "").strip()
    try:
        value = float(raw)
    except ValueError:
        return None
    return value if value > 0 else None


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _last_step_seconds(output_dir: Path) -> float | None:
    """The duration of the last logged step, from the last two step records of metrics.jsonl."""
    path = Path(output_dir) / "metrics.jsonl"
    try:
        with path.open("rb") as handle:
            start = max(0, path.stat().st_size - 8192)
            handle.seek(start)
            lines = handle.read().decode("utf-8", errors="replace").splitlines()[1 if start else 0 :]
    except OSError:
        return None
    records = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and isinstance(record.get("elapsed_s"), float | int):
            records.append(record)
    if len(records) < 2:
        return None
    a, b = records[-2], records[-1]
    if b["step"] <= a["step"] or b["elapsed_s"] <= a["elapsed_s"]:
        return None
    return (b["elapsed_s"] - a["elapsed_s"]) / (b["step"] - a["step"])


def stop_notice(output_dir: Path, saving: bool, estimated_bytes: int | None, grace_s: float | None) -> str:
    """One line: what happens on this SIGTERM, and whether the checkpoint should be sealed before SIGKILL."""
    from spo_align.run_folder import checkpoint_cost, last_checkpoint

    last = last_checkpoint(Path(output_dir))
    fallback = (
        f"the same command continues from {last} (step {last.name.removeprefix('checkpoint-')})"
        if last is not None else "the same command starts the run over (no checkpoint is sealed yet)"
    )
    if not saving:
        return f"SIGTERM outside training (loading, tokenizing, or the final save): stopping now, nothing to save; {fallback}"
    head = "SIGTERM: saving a checkpoint at the end of this step, then stopping (a second SIGTERM stops at once)"
    size, write_s = checkpoint_cost(last) if last is not None else (None, None)
    if size is not None:
        size_from = f"the size of {last.name}"  # type: ignore[union-attr]
    elif estimated_bytes is not None:
        size, size_from = estimated_bytes, f"estimated: weights + {OPTIMIZER_BYTES_PER_PARAM} B per trained parameter"
    else:
        return f"{head}; its size is not known yet; if the process is killed before it is sealed, {fallback}"
    if write_s is not None and write_s > 0 and size:
        speed, speed_from = size / write_s, f"measured at {last.name}'s save"  # type: ignore[union-attr]
    else:
        speed, speed_from = ASSUMED_BYTES_PER_S, "assumed, none measured yet"
    need = size / speed
    step_s = _last_step_seconds(output_dir)
    if step_s is not None:
        need += step_s
    cost = (
        f"{_size(size)} ({size_from}) at {_size(speed)}/s ({speed_from})"
        + (f" after up to one more step ({step_s:.0f} s)" if step_s is not None else "")
        + f": about {need:.0f} s"
    )
    if grace_s is None:
        return (
            f"{head}. Writing it: {cost}; the time before SIGKILL is not known (set {GRACE_ENV}); if the process is "
            f"killed before the checkpoint is sealed, {fallback}"
        )
    if need <= grace_s:
        return f"{head}. Writing it: {cost}; it should fit in the {grace_s:.0f} s grace ({GRACE_ENV})"
    return (
        f"{head}. Writing it: {cost}; it will likely NOT fit in the {grace_s:.0f} s grace ({GRACE_ENV}): if the "
        f"process is killed before the checkpoint is sealed, {fallback}"
    )
