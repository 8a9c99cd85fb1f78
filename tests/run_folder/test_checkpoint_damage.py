"""A checkpoint damaged after its seal (a file deleted, zeroed in place, overwritten with random bytes of the same
size) is named in one line, kept, and never resumed from; the seal's checksums are what tells same-size damage."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from spo_align.run_folder.checkpoints import SEAL, damage, has_seal, is_sealed, seal
from spo_align.run_folder.checksums import CHUNK, default_algorithm, file_checksum
from spo_align.run_folder.layout import RESOLVED_RECIPE
from spo_align.run_folder.lifecycle import OutputFolderError, claim_folder
from spo_align.run_folder.recipe_hash import RecipeSettings

SETTINGS = RecipeSettings({"stage": "preference", "loss.beta": 0.1})


def _checkpoint(out: Path, step: int) -> Path:
    folder = out / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(os.urandom(3 * 4096))
    (folder / "optimizer.pt").write_bytes(os.urandom(5 * 4096))
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step, "max_steps": 100}))
    seal(folder)
    return folder


def _run(out: Path, *steps: int) -> Path:
    out.mkdir(parents=True)
    (out / RESOLVED_RECIPE).write_text("stage: preference\n")
    SETTINGS.write(out)
    for step in steps:
        _checkpoint(out, step)
    return out


def _zero(path: Path, offset: int = 100, length: int = 64) -> None:
    with path.open("r+b") as handle:
        handle.seek(offset)
        handle.write(b"\0" * length)


def _scramble(path: Path) -> None:
    path.write_bytes(os.urandom(path.stat().st_size))


def test_the_seal_carries_a_checksum_of_every_file(tmp_path: Path):
    folder = _checkpoint(tmp_path, 4)
    body = json.loads((folder / SEAL).read_text())
    assert body["checksum"] == default_algorithm() == "xxh3_64"  # xxhash comes with datasets
    assert set(body["checksums"]) == set(body["files"]) == {"model.safetensors", "optimizer.pt", "trainer_state.json"}
    for name, value in body["checksums"].items():
        assert value == file_checksum(folder / name)
    assert damage(folder) is None


@pytest.mark.parametrize(
    ("harm", "said"),
    [
        (lambda f: (f / "optimizer.pt").unlink(), "checkpoint-8: optimizer.pt missing"),
        (lambda f: _zero(f / "model.safetensors"), "checkpoint-8: model.safetensors checksum mismatch"),
        (lambda f: _scramble(f / "optimizer.pt"), "checkpoint-8: optimizer.pt checksum mismatch"),
    ],
    ids=["optimizer-deleted", "weights-zeroed-same-size", "optimizer-random-same-size"],
)
def test_a_damaged_only_checkpoint_is_named_kept_and_not_resumed_from(tmp_path: Path, harm, said: str):
    out = _run(tmp_path / "run", 8)
    harm(out / "checkpoint-8")
    before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    for resume in (False, True):
        with pytest.raises(OutputFolderError) as exc:
            claim_folder(out, SETTINGS, resume=resume, overwrite=False)
        message = str(exc.value)
        assert "\n" not in message and said in message and "nothing was deleted" in message
        assert "--overwrite to start the run over" in message and "move" not in message
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before  # kept, every file
    assert has_seal(out / "checkpoint-8")
    assert claim_folder(out, SETTINGS, resume=False, overwrite=True).checkpoint is None  # the user says so


def test_with_an_older_intact_checkpoint_the_line_says_how_to_continue_from_it(tmp_path: Path):
    out = _run(tmp_path / "run", 4, 8)
    _zero(out / "checkpoint-8" / "model.safetensors")
    with pytest.raises(OutputFolderError) as exc:
        claim_folder(out, SETTINGS, resume=False, overwrite=False)
    assert "checkpoint-8: model.safetensors checksum mismatch" in str(exc.value)
    assert "move checkpoint-8 out of the folder to continue from checkpoint-4" in str(exc.value)
    assert (out / "checkpoint-8").is_dir() and (out / "checkpoint-4").is_dir()
    (out / "checkpoint-8").rename(tmp_path / "checkpoint-8-damaged")
    assert claim_folder(out, SETTINGS, resume=True, overwrite=False).checkpoint == out / "checkpoint-4"


def test_an_older_damaged_checkpoint_is_no_leftover_of_an_interrupted_save(tmp_path: Path):
    """Continuing from the newest intact checkpoint does not delete an older damaged one as if never sealed."""
    out = _run(tmp_path / "run", 4, 8)
    (out / "checkpoint-4" / "optimizer.pt").unlink()
    assert not is_sealed(out / "checkpoint-4") and has_seal(out / "checkpoint-4")
    assert claim_folder(out, SETTINGS, resume=False, overwrite=False).checkpoint == out / "checkpoint-8"
    assert (out / "checkpoint-4").is_dir()


def test_a_seal_without_checksums_is_checked_by_size(tmp_path: Path):
    """Checkpoints sealed before checksums existed still continue (sizes checked)."""
    out = _run(tmp_path / "run", 4)
    folder = out / "checkpoint-4"
    body = json.loads((folder / SEAL).read_text())
    (folder / SEAL).write_text(json.dumps({"step": 4, "files": body["files"]}))
    assert claim_folder(out, SETTINGS, resume=True, overwrite=False).checkpoint == folder


def test_crc32_is_the_fallback_and_reads_in_chunks(tmp_path: Path):
    import zlib

    path = tmp_path / "big.bin"
    data = os.urandom(CHUNK + 12345)  # more than one chunk
    path.write_bytes(data)
    assert file_checksum(path, "crc32") == f"{zlib.crc32(data):08x}"
    import xxhash

    assert file_checksum(path, "xxh3_64") == xxhash.xxh3_64(data).hexdigest()


# ---------------------------------------------------------------- the same through `spo train`

HERE = Path(__file__).resolve().parents[1] / "train"
RECIPES = HERE.parent / "data" / "recipes"


@pytest.mark.slow
def test_spo_train_names_a_damaged_checkpoint_keeps_it_and_continues_from_an_older_one_once_moved(
    small_model: Path, tmp_path: Path
):
    from typer.testing import CliRunner

    from spo_align.cli import app

    out = tmp_path / "out"
    args = [
        "train", str(RECIPES / "spo.yaml"), "--set", f"model.name_or_path={small_model}", "--set", f"output.dir={out}",
        "--set", "training.max_steps=8", "--set", "training.save_steps=3", "--set", "data.train.0.max_samples=64",
    ]
    env = {**os.environ, "SIGNAL_AT": "4", "SIGNAL": "TERM", "OMP_NUM_THREADS": "1"}
    stopped = subprocess.run([sys.executable, str(HERE / "signal_at_step.py"), *args], env=env,
                             capture_output=True, text=True, timeout=600)
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    assert is_sealed(out / "checkpoint-3") and is_sealed(out / "checkpoint-4")
    _zero(out / "checkpoint-4" / "model.safetensors", offset=4096)  # same size, bytes of the weights zeroed
    before = {str(p.relative_to(out)): p.stat().st_mtime for p in out.rglob("*")}
    time.sleep(0.01)

    refused = CliRunner().invoke(app, args)
    assert refused.exit_code == 1 and "Traceback" not in refused.output
    assert "checkpoint-4: model.safetensors checksum mismatch" in refused.stderr
    assert "move checkpoint-4 out of the folder to continue from checkpoint-3" in refused.stderr
    assert {str(p.relative_to(out)): p.stat().st_mtime for p in out.rglob("*")} == before  # nothing touched

    (out / "checkpoint-4").rename(tmp_path / "checkpoint-4-damaged")
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0, again.output
    assert json.loads((out / "run.json").read_text())["resumed_from"].endswith("checkpoint-3")
    assert (out / "COMPLETE").exists()
