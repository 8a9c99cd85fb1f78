"""The image's entrypoint as a container's first process, for real: a PID namespace made with `unshare`, the init
that docker/Dockerfile's ENTRYPOINT names (tini, from Debian/Ubuntu's apt as in the image), and `spo train`
in-process on CPU. `docker stop` signals the container's PID 1, and the kernel drops a signal that PID 1 has no
handler for; so the signals here go to PID 1 of the namespace, at a chosen moment (signal_at_step.py,
SIGNAL_PID=1). Without an init, `spo` is PID 1: a SIGTERM while the model loads and a second SIGTERM did nothing.

Docker itself is not run (no engine on the development machines); the namespace, the init and the signals are
the real ones.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from spo_align.run_folder import checkpoint_folders, is_sealed

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
RECIPES = HERE.parent / "data" / "recipes"


def _entrypoint() -> list[str]:
    text = (REPO / "docker" / "Dockerfile").read_text(encoding="utf-8")
    return json.loads(re.findall(r"^ENTRYPOINT\s+(\[.*\])\s*$", text, flags=re.M)[-1])


ENTRY = _entrypoint()
INIT = ENTRY[:-1]  # what runs `spo`: ["tini", "--"]


def _can_make_a_pid_namespace() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True)
    return probe.returncode == 0


pytestmark = [
    pytest.mark.skipif(not _can_make_a_pid_namespace(), reason="no PID namespace here (unshare, root needed)"),
    pytest.mark.skipif(bool(INIT) and shutil.which(INIT[0]) is None, reason=f"the image's init {INIT[:1]} is not installed here"),
]


def _args(model: Path, out: Path) -> list[str]:
    return [
        "train", str(RECIPES / "spo.yaml"), "--set", f"model.name_or_path={model}", "--set", f"output.dir={out}",
        "--set", "training.max_steps=8", "--set", "training.save_steps=100", "--set", "data.train.0.max_samples=64",
    ]


def _as_the_container(args: list[str], at: str, signal_name: str = "TERM") -> subprocess.CompletedProcess:
    assert ENTRY[-1] == "spo"
    env = {**os.environ, "SIGNAL_AT": at, "SIGNAL": signal_name, "SIGNAL_PID": "1", "OMP_NUM_THREADS": "1"}
    command = ["unshare", "--pid", "--fork", "--mount-proc", *INIT, sys.executable, str(HERE / "signal_at_step.py"), *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_docker_stop_while_the_model_loads_ends_the_run_at_once(small_model: Path, tmp_path: Path):
    out = tmp_path / "out"
    stopped = _as_the_container(_args(small_model, out), "load")
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-3000:]
    assert not (out / "metrics.jsonl").exists() and not (out / "COMPLETE").exists()  # not one step trained


@pytest.mark.slow
def test_docker_stop_during_a_step_saves_that_step_and_stops(small_model: Path, tmp_path: Path):
    out = tmp_path / "out"
    stopped = _as_the_container(_args(small_model, out), "3")
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-3000:]
    assert any(f"after step 3: {out / 'checkpoint-3'} is saved" in line for line in stopped.stderr.splitlines())
    assert is_sealed(out / "checkpoint-3") and not (out / "COMPLETE").exists()


@pytest.mark.slow
def test_a_second_sigterm_to_the_container_ends_it_at_once(small_model: Path, tmp_path: Path):
    out = tmp_path / "out"
    stopped = _as_the_container(_args(small_model, out), "2,2")
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-3000:]
    assert not any(line.startswith("stopped:") for line in stopped.stderr.splitlines()), stopped.stderr[-3000:]
    assert checkpoint_folders(out) == []


@pytest.mark.slow
def test_ctrl_c_to_the_container_while_the_model_loads_is_an_interruption(small_model: Path, tmp_path: Path):
    out = tmp_path / "out"
    stopped = _as_the_container(_args(small_model, out), "load", "INT")
    assert stopped.returncode == 130, stopped.stderr[-3000:]
    assert sum(line.startswith("interrupted:") for line in stopped.stderr.splitlines()) == 1
