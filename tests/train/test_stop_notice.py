"""What `spo` says on a SIGTERM and at the end of a stopped launch: the checkpoint really written, and whether a
save should fit in the grace the user states (SPO_STOP_GRACE_S). Real checkpoint folders, sealed as in a run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from spo_align.run_folder import seal
from spo_align.train.launch import _check_finished, estimated_checkpoint_bytes
from spo_align.train.preemption import RunStopped
from spo_align.train.stopping import GRACE_ENV, grace_seconds, stop_notice


def _checkpoint(out: Path, step: int, size: int, write_s: float | None = None, seal_s: float = 0.0) -> Path:
    import time

    folder = out / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step, "max_steps": 100}))
    (folder / "model.safetensors").write_bytes(b"\0" * (size - (folder / "trainer_state.json").stat().st_size))
    seal(folder, write_s=write_s, started=None if write_s is None else time.monotonic() - seal_s)
    return folder


def test_the_notice_compares_the_last_checkpoints_measured_save_with_the_stated_grace(tmp_path: Path):
    _checkpoint(tmp_path, 40, size=1_000_000, write_s=1.5, seal_s=0.5)  # 2 s for 1 MB: 0.5 MB/s
    fits = stop_notice(tmp_path, True, None, grace_s=10)
    assert "1.0 MB (the size of checkpoint-40)" in fits and "measured at checkpoint-40's save" in fits
    assert "about 2 s" in fits and "should fit in the 10 s grace" in fits
    late = stop_notice(tmp_path, True, None, grace_s=1)
    assert "will likely NOT fit in the 1 s grace" in late
    assert f"continues from {tmp_path / 'checkpoint-40'} (step 40)" in late
    unknown = stop_notice(tmp_path, True, None, grace_s=None)
    assert f"not known (set {GRACE_ENV})" in unknown and "checkpoint-40 (step 40)" in unknown


def test_before_the_first_checkpoint_the_size_is_estimated_and_the_speed_assumed(tmp_path: Path):
    notice = stop_notice(tmp_path, True, 3_000_000_000, grace_s=10)
    assert "3.0 GB (estimated" in notice and "100.0 MB/s (assumed" in notice and "about 30 s" in notice
    assert "NOT fit" in notice and "starts the run over (no checkpoint is sealed yet)" in notice


def test_the_last_step_time_counts_towards_the_save(tmp_path: Path):
    _checkpoint(tmp_path, 2, size=1_000_000, write_s=1.0)
    rows = [{"step": 1, "elapsed_s": 10.0}, {"step": 2, "elapsed_s": 40.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    notice = stop_notice(tmp_path, True, None, grace_s=20)
    assert "after up to one more step (30 s)" in notice and "about 31 s" in notice and "NOT fit" in notice


def test_outside_training_the_notice_says_nothing_is_saved(tmp_path: Path):
    _checkpoint(tmp_path, 6, size=1000)
    assert "nothing to save" in stop_notice(tmp_path, False, None, grace_s=None)
    assert "checkpoint-6 (step 6)" in stop_notice(tmp_path, False, None, grace_s=None)


def test_the_grace_is_read_from_the_environment(monkeypatch: pytest.MonkeyPatch):
    for raw, want in (("120", 120.0), ("2.5", 2.5), ("", None), ("ten", None), ("0", None)):
        monkeypatch.setenv(GRACE_ENV, raw)
        assert grace_seconds() == want, raw


def test_a_stopped_launch_names_the_checkpoint_the_ranks_wrote_and_never_calls_an_older_one_saved(tmp_path: Path):
    two = _checkpoint(tmp_path, 2, size=1000)
    with pytest.raises(RunStopped) as unsaved:  # the ranks recorded no stop: they did not get to save
        _check_finished(tmp_path, None)
    assert "is saved" not in str(unsaved.value) and f"newest sealed one is {two} (step 2)" in str(unsaved.value)
    four = tmp_path / "checkpoint-4"
    four.mkdir()  # recorded, but its seal never written
    with pytest.raises(RunStopped) as torn:
        _check_finished(tmp_path, (4, str(four)))
    assert "is saved" not in str(torn.value) and str(two) in str(torn.value)
    four.rmdir()
    _checkpoint(tmp_path, 4, size=1000)
    with pytest.raises(RunStopped) as saved:
        _check_finished(tmp_path, (4, str(four)))
    assert f"after step 4: {four} is saved" in str(saved.value)


def test_ranks_stopped_by_someone_else_report_the_newest_sealed_checkpoint_as_found(tmp_path: Path):
    four = _checkpoint(tmp_path, 4, size=1000)
    with pytest.raises(RunStopped) as found:  # e.g. another node's spo told them; this one was not told
        _check_finished(tmp_path, None, told_to_stop=False)
    assert "without saving" not in str(found.value) and f"newest sealed checkpoint is {four} (step 4)" in str(found.value)


def test_with_no_checkpoint_at_all_a_stopped_launch_says_the_run_starts_over(tmp_path: Path):
    with pytest.raises(RunStopped) as nothing:
        _check_finished(tmp_path, None)
    assert "start it over" in str(nothing.value)


def test_the_estimate_before_a_checkpoint_is_the_weights_plus_adam_state(plan_for, small_model: Path):
    from safetensors import safe_open

    with safe_open(str(small_model / "model.safetensors"), "pt") as tensors:
        loaded = [tensors.get_tensor(name) for name in tensors.keys()]
    params = sum(t.numel() for t in loaded)
    weights = sum(t.numel() * t.element_size() for t in loaded)
    assert estimated_checkpoint_bytes(plan_for("spo")) == weights + 12 * params
    assert estimated_checkpoint_bytes(plan_for("spo", "adapter.type=lora")) is None
