"""Sealing a checkpoint: each rank flushes the files it wrote itself, in parallel, before rank 0 writes the seal
(a real 2-process gloo group, real files, real fsync)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from spo_align.run_folder import checkpoint_cost, file_writer, is_sealed

HERE = Path(__file__).resolve().parent


def test_a_checkpoint_file_is_flushed_by_the_rank_whose_number_it_carries():
    assert file_writer("rng_state_1.pth", 2) == 1
    assert file_writer("zero_pp_rank_1_mp_rank_00_optim_states.pt", 2) == 1
    assert file_writer("bf16_zero_pp_rank_3_mp_rank_00_optim_states.pt", 4) == 3
    assert file_writer("zero_pp_rank_0_mp_rank_00_model_states.pt", 2) == 0
    for name in ("model.safetensors", "mp_rank_00_model_states.pt", "rng_state.pth", "trainer_state.json", "latest"):
        assert file_writer(name, 2) == 0, name
    assert file_writer("rng_state_5.pth", 2) == 0  # no such rank: the main process


def test_a_file_another_rank_is_still_writing_is_not_rank_0s_to_flush(tmp_path: Path):
    """Rank 1 writes its logging window durably (a hidden temporary file, then a rename) while rank 0 lists the
    folder to flush its own files: the temporary file is nobody's checkpoint file, so rank 0 neither sums it (it
    would be gone by the time it is read: a crash on rank 0 in CI) nor seals it."""
    from spo_align.run_folder import flush_own_files, seal

    folder = tmp_path / "checkpoint-4"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"weights")
    (folder / "logging_window_0.json").write_text("{}\n")
    being_written = folder / f".logging_window_1.json.tmp-{os.getpid()}"
    being_written.write_text("{")
    flush_own_files(folder, 0, 2)
    sums = json.loads((folder / ".spo-sums-0.json").read_text())["checksums"]
    assert set(sums) == {"model.safetensors", "logging_window_0.json"}
    being_written.rename(folder / "logging_window_1.json")
    flush_own_files(folder, 1, 2)
    seal(folder, files_flushed=True)
    assert is_sealed(folder)
    assert set(json.loads((folder / "spo_checkpoint.json").read_text())["files"]) == {
        "model.safetensors", "logging_window_0.json", "logging_window_1.json"}


@pytest.mark.slow
def test_each_rank_flushes_its_own_files_and_rank_0_seals_after_both(tmp_path: Path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = []
    for rank in (0, 1):
        env = {
            **os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
        }
        procs.append(subprocess.Popen(
            [sys.executable, str(HERE / "seal_two_ranks.py"), str(tmp_path)], env=env, stderr=subprocess.PIPE, text=True
        ))
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
    folder = tmp_path / "checkpoint-4"
    assert is_sealed(folder)
    size, seconds = checkpoint_cost(folder)
    assert size == sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and p.name != "spo_checkpoint.json")
    assert seconds is not None and seconds >= 0
    runs = [json.loads((tmp_path / f"fsynced-{rank}.json").read_text()) for rank in (0, 1)]
    for rank, run in enumerate(runs):
        files = {str(folder / name) for name in run["wrote"]}
        flushed = set(run["fsynced"])
        assert files <= flushed, (rank, files - flushed)  # every file it wrote, by itself
        other = {str(folder / name) for name in runs[1 - rank]["wrote"]}
        assert not flushed & other, (rank, flushed & other)  # none of the other rank's
    # each rank took the checksums of its own files (its sums file), and rank 0 put them all into the seal
    for rank, run in enumerate(runs):
        assert any(f".spo-sums-{rank}.json" in path for path in run["fsynced"]), rank
        assert not any(f".spo-sums-{1 - rank}.json" in path for path in run["fsynced"]), rank
    from spo_align.run_folder.checkpoints import SEAL, damage
    from spo_align.run_folder.checksums import file_checksum

    body = json.loads((folder / SEAL).read_text())
    assert body["checksums"].keys() == body["files"].keys() and len(body["files"]) == 11
    assert all(body["checksums"][name] == file_checksum(folder / name) for name in body["files"])
    assert not list(folder.glob(".spo-sums-*")) and damage(folder) is None
