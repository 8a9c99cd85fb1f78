"""A SIGTERM to `spo train` stops a launched run the way it stops an in-process one, whatever the launcher: every
rank saves the same step's checkpoint and exits, `spo` exits 143 naming that checkpoint, and the same command then
ends with the weights of a run never stopped. Real launchers, 2 ranks on CPU over gloo, a real signal."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from spo_align.run_folder import checkpoint_folders, is_sealed

pytest.importorskip("deepspeed")

TESTS = Path(__file__).resolve().parents[1]
RECIPES = TESTS / "data" / "recipes"
HOOK = TESTS / "data" / "signal_parent"
STEPS = 12
# `spo train` in this process, its pid in the environment, so that rank 0's hook can signal it. A test runner
# started in the background (no job control) passes SIGINT on as ignored, and `spo` rightly leaves an ignored
# SIGINT ignored; a terminal's Ctrl-C reaches a process with Python's own handler, which this restores.
SPO = "import os, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); " \
    "os.environ['SPO_TEST_PARENT_PID'] = str(os.getpid()); sys.argv[0] = 'spo'; " \
    "from spo_align.cli import main; main()"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _args(model: Path, out: Path, launcher: str) -> list[str]:
    return [
        "train", str(RECIPES / "spo_zero3.yaml"), "--set", f"model.name_or_path={model}", "--set", f"output.dir={out}",
        "--set", f"training.max_steps={STEPS}", "--set", "training.save_steps=100", "--set", "data.train.0.max_samples=8",
        "--set", f"distributed.launcher={launcher}",
    ]


def _spo(args: list[str], pids: Path, signal_at: int | str | None = None, signal_name: str = "TERM") -> tuple[int, str]:
    env = {
        **os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": str(_free_port()), "SPO_TEST_RANK_PIDS": str(pids),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(HOOK), os.environ.get("PYTHONPATH")])),
    }
    if signal_at is not None:
        env["SPO_TEST_SIGNAL_PARENT_AT"] = str(signal_at)
        env["SPO_TEST_SIGNAL"] = signal_name
    pids.mkdir(exist_ok=True)
    # stderr to a file, not a pipe: a rank left running would hold a pipe open and the test would wait for it
    log = pids.with_suffix(".log")
    with log.open("w") as stderr:
        proc = subprocess.Popen([sys.executable, "-c", SPO, *args], env=env, stdout=subprocess.DEVNULL, stderr=stderr)
        try:
            returncode = proc.wait(timeout=900)
        finally:
            proc.kill()
    return returncode, log.read_text()


def _running(pid: int) -> bool:
    """True while `pid` runs (a zombie has ended)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def _rank_pids(folder: Path) -> list[int]:
    return [int(path.read_text()) for path in sorted(folder.iterdir())]


@pytest.fixture(scope="module")
def straight(small_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The recipe run once without a stop, 2 ranks under torchrun. The deepspeed, torchrun and accelerate launches
    of this recipe train bit-identical weights (same ZeRO-3 engine, ranks and data order; compared when this
    fixture replaced one such run per launcher), so each launcher's stopped and continued run is held to it."""
    folder = tmp_path_factory.mktemp("straight")
    out = folder / "out"
    code, log = _spo(_args(small_model, out, "torchrun"), folder / "pids")
    assert code == 0, log[-3000:]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["deepspeed", "torchrun", "accelerate"])
def test_a_sigterm_to_spo_stops_every_rank_at_one_saved_step_and_the_same_command_finishes_the_run(
    small_model: Path, straight: Path, tmp_path: Path, launcher: str
):
    from safetensors.torch import load_file

    out = tmp_path / "out"
    pids = tmp_path / "pids"
    try:
        code, log = _spo(_args(small_model, out, launcher), pids, signal_at=3)
        alive = [pid for pid in _rank_pids(pids) if _running(pid)]
    finally:
        for pid in _rank_pids(pids) if pids.is_dir() else []:
            if _running(pid):
                os.kill(pid, signal.SIGKILL)  # a rank left behind by a failed stop must not train on
    assert len(_rank_pids(pids)) == 2
    assert not alive, f"ranks {alive} outlived spo: {log[-3000:]}"
    assert code == 128 + signal.SIGTERM, log[-3000:]
    # One checkpoint, sealed, holding both ranks' shards of the same step.
    folders = checkpoint_folders(out)
    assert len(folders) == 1, folders
    step, checkpoint = folders[0]
    assert 3 <= step < STEPS and is_sealed(checkpoint)
    for rank in (0, 1):
        assert (checkpoint / f"rng_state_{rank}.pth").is_file()
        assert list(checkpoint.glob(f"global_step{step}/*zero_pp_rank_{rank}_*optim_states.pt")), rank
    lines = [line for line in log.splitlines() if line.startswith("stopped:")]
    assert len(lines) == 1 and f"after step {step}: {checkpoint} is saved" in lines[0], log[-3000:]
    assert not (out / "COMPLETE").exists()

    code, log = _spo(_args(small_model, out, launcher), tmp_path / "pids-again")
    assert code == 0, log[-3000:]
    assert json.loads((out / "run.json").read_text())["resumed_from"] == str(checkpoint)
    want, got = load_file(straight / "model.safetensors"), load_file(out / "model.safetensors")
    assert want.keys() == got.keys()
    for name in want:
        assert (want[name] - got[name]).abs().max().item() <= 1e-6, name


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["deepspeed", "torchrun"])
def test_a_sigterm_to_spo_before_training_stops_the_launcher_and_every_rank_now(
    small_model: Path, tmp_path: Path, launcher: str
):
    """No rank can save yet (rank 0 is loading the model): the whole launch stops, nothing is left running, and
    `spo` says that nothing was saved."""
    out = tmp_path / "out"
    pids = tmp_path / "pids"
    try:
        code, log = _spo(_args(small_model, out, launcher), pids, signal_at="load")
        alive = [pid for pid in _rank_pids(pids) if _running(pid)]
    finally:
        for pid in _rank_pids(pids) if pids.is_dir() else []:
            if _running(pid):
                os.kill(pid, signal.SIGKILL)
    assert not alive, f"ranks {alive} outlived spo: {log[-3000:]}"
    assert code == 128 + signal.SIGTERM, log[-3000:]
    assert any("SIGTERM outside training" in line for line in log.splitlines()), log[-3000:]
    lines = [line for line in log.splitlines() if line.startswith("stopped:")]
    assert len(lines) == 1 and "before a checkpoint was saved" in lines[0], log[-3000:]
    assert checkpoint_folders(out) == [] and not (out / "metrics.jsonl").exists()


@pytest.mark.slow
def test_ctrl_c_to_spo_stops_a_deepspeed_launch_and_leaves_nothing_running(small_model: Path, tmp_path: Path):
    """The launcher runs in a session of its own, so a terminal's SIGINT reaches `spo` alone: `spo` passes it to the
    launcher's process group and waits for it, then says the run was interrupted."""
    out = tmp_path / "out"
    pids = tmp_path / "pids"
    try:
        code, log = _spo(_args(small_model, out, "deepspeed"), pids, signal_at=3, signal_name="INT")
        alive = [pid for pid in _rank_pids(pids) if _running(pid)]
    finally:
        for pid in _rank_pids(pids) if pids.is_dir() else []:
            if _running(pid):
                os.kill(pid, signal.SIGKILL)
    assert not alive, f"ranks {alive} outlived spo: {log[-3000:]}"
    assert code == 130, log[-3000:]
    assert sum(line.startswith("interrupted:") for line in log.splitlines()) == 1, log[-3000:]
    assert checkpoint_folders(out) == [] and not (out / "COMPLETE").exists()
