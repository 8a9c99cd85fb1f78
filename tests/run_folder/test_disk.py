"""`spo train` on a disk that fills up, a read-only folder and a file in the way: one `error:` line, exit
code 1, no traceback, never a folder marked finished, and nothing already saved lost.

The full and read-only disks are real: a small tmpfs mounted in a private mount namespace (`unshare`,
with a user namespace when not root). Where namespaces are not allowed, the full disk is a file-size
limit (RLIMIT_FSIZE) on the `spo train` process instead, which fails writes the same way (EFBIG).
"""

from __future__ import annotations

import json
import math
import os
import resource
import shlex
import shutil
import signal
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest
from typer.testing import CliRunner

from spo_align.cli import app

RECIPES = Path(__file__).resolve().parents[1] / "data" / "recipes"
PAGE = 4096


def _args(model: Path, out: Path) -> list[str]:
    return [
        "train", str(RECIPES / "spo.yaml"), "--set", f"model.name_or_path={model}", "--set", f"output.dir={out}",
        "--set", "training.max_steps=6", "--set", "training.save_steps=3", "--set", "training.save_total_limit=1",
        "--set", "data.train.0.max_samples=16",
    ]


def _unshare() -> list[str]:
    return ["unshare", "--mount", "--propagation", "private", *([] if os.geteuid() == 0 else ["--user", "--map-root-user"])]


@cache
def _can_mount() -> bool:
    if shutil.which("unshare") is None:
        return False
    done = subprocess.run([*_unshare(), "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt || mount -t tmpfs tmpfs /tmp"],
                          capture_output=True)
    return done.returncode == 0


def _in_tmpfs(mount: Path, size_kib: int, script: str) -> subprocess.CompletedProcess:
    """Run `script` (sh) with a `size_kib` tmpfs at `mount`; the mount vanishes when it ends."""
    mount.mkdir(parents=True, exist_ok=True)
    body = f"mount -t tmpfs -o size={size_kib}k tmpfs {shlex.quote(str(mount))} && {script}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([*_unshare(), "sh", "-c", body], capture_output=True, text=True, env=env, timeout=600)


def _spo(args: list[str]) -> str:
    return shlex.join([sys.executable, "-m", "spo_align.cli", *args])


def _kib(paths: list[Path]) -> int:
    return sum(math.ceil(p.stat().st_size / PAGE) * PAGE // 1024 for p in paths if p.is_file())


def _one_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, stderr[-3000:]
    return errors[0]


@pytest.mark.slow
def test_a_full_disk_is_one_error_line_and_the_run_continues_once_there_is_room(
    small_model: Path, tmp_path: Path
):
    probe = tmp_path / "probe"
    assert CliRunner().invoke(app, _args(small_model, probe)).exit_code == 0
    checkpoint = _kib(list((probe / "checkpoint-6").rglob("*")))
    claimed = _kib([probe / n for n in ("resolved_recipe.yaml", "recipe_hash.json", "run.json", "metrics.jsonl")])
    out, kept = tmp_path / "disk" / "run", tmp_path / "kept"
    tmpfs = _can_mount()
    if tmpfs:
        # Room for the claim and checkpoint-3, not for checkpoint-6 beside it: the disk fills mid-run.
        size = claimed + checkpoint + checkpoint // 2 + 8
        done = _in_tmpfs(tmp_path / "disk", size, f"{_spo(_args(small_model, out))}; rc=$?; "
                         f"cp -a {shlex.quote(str(out))} {shlex.quote(str(kept))}; exit $rc")
        stderr, code = done.stderr, done.returncode
    else:  # a file-size limit: the first write past it fails like a full disk (EFBIG)
        limit = max(p.stat().st_size for p in (probe / "checkpoint-6").iterdir()) - 1

        def limited() -> None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

        proc = subprocess.run([sys.executable, "-m", "spo_align.cli", *_args(small_model, kept)],
                              capture_output=True, text=True, preexec_fn=limited, timeout=600)
        stderr, code = proc.stderr, proc.returncode
    assert code == 1, stderr[-3000:]
    line = _one_error_line(stderr)
    assert ("no space left" in line or "file too large" in line or "a write failed" in line), line
    assert "is not finished" in line and "run the same command again" in line
    assert not (kept / "COMPLETE").exists()

    if tmpfs:  # checkpoint-3 was saved before the disk filled: with room again, the run goes on from it
        from spo_align.run_folder.checkpoints import is_sealed

        assert is_sealed(kept / "checkpoint-3") and not is_sealed(kept / "checkpoint-6")
        again = CliRunner().invoke(app, _args(small_model, kept))
        assert again.exit_code == 0, again.output
        assert (kept / "COMPLETE").exists()
        assert json.loads((kept / "run.json").read_text())["resumed_from"].endswith("checkpoint-3")


@pytest.mark.slow
def test_a_read_only_output_folder_is_one_error_line(small_model: Path, tmp_path: Path):
    if not _can_mount():
        pytest.skip("mount namespaces are not allowed here")
    disk = tmp_path / "disk"
    new, existing = disk / "new", disk / "existing"
    script = (
        f"mkdir {shlex.quote(str(existing))} && mount -o remount,ro {shlex.quote(str(disk))} && "
        f"{_spo(_args(small_model, new))}; echo rc=$? >&2; {_spo(_args(small_model, existing))}; echo rc=$? >&2"
    )
    done = _in_tmpfs(disk, 1024, script)
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith(("error: ", "rc="))]
    assert errors == [
        f"error: output.dir {new} cannot be created: Read-only file system", "rc=1",
        f"error: output.dir {existing} is not writable: Read-only file system", "rc=1",
    ]


def test_an_output_dir_under_a_file_is_one_error_line(small_model: Path, tmp_path: Path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    result = CliRunner().invoke(app, _args(small_model, blocker / "run"))
    assert result.exit_code == 1 and "Traceback" not in result.output
    # refused with the recipe's own errors, at output.dir, before anything is loaded
    assert f"output.dir: output.dir '{blocker}/run' cannot be created: {blocker} is a file, not a folder" in result.stdout
