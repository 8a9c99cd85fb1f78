"""A data source replaced mid-run is noticed: run.json records what each source held when the run read it (rows,
size, a checksum of the whole local file); a continued run whose data differs is refused in one line naming the
source and what changed, unless `--accept-data-change`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from spo_align import run_folder
from spo_align.run_folder.checkpoints import seal
from spo_align.run_folder.checksums import file_checksum
from spo_align.run_folder.lifecycle import OutputFolderError

REPO = Path(__file__).resolve().parents[2]
PAIRS = REPO / "data" / "tiny" / "pairs_train.jsonl"


def _rows(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line.strip()]


def _stopped_run(plan) -> Path:
    """The folder of a run of `plan` stopped after its first checkpoint (claimed for real, checkpoint sealed)."""
    assert run_folder.claim(plan, resume=False, overwrite=False, command="spo train x") is None
    out = Path(plan.output_dir)
    checkpoint = out / "checkpoint-6"
    checkpoint.mkdir()
    (checkpoint / "model.safetensors").write_bytes(b"w" * 64)
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": 6, "max_steps": 12}))
    seal(checkpoint)
    return out


@pytest.fixture
def data(tmp_path: Path) -> Path:
    path = tmp_path / "data" / "pairs.jsonl"
    path.parent.mkdir()
    shutil.copy(PAIRS, path)
    return path


def test_run_json_records_each_source_as_read(plan_for, data: Path):
    out = _stopped_run(plan_for("spo", f"data.train.0.path={data}"))
    recorded = run_folder.read_run_info(out)["data_sources"]
    assert recorded == {"data.train.0": {
        "path": str(data), "split": "train", "rows": len(_rows(data)), "algorithm": "xxh3_64", "kind": "file",
        "bytes": data.stat().st_size, "checksum": file_checksum(data),
    }}


@pytest.mark.parametrize("change", ["fewer-rows", "chosen-rejected-swapped"])
def test_a_continued_run_on_changed_data_is_refused_naming_the_source(plan_for, data: Path, change: str):
    plan = plan_for("spo", f"data.train.0.path={data}")
    out = _stopped_run(plan)
    rows = _rows(data)
    before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    if change == "fewer-rows":
        data.write_text("\n".join(rows[: len(rows) // 4]) + "\n")
        said = f"rows {len(rows)} -> {len(rows) // 4}"
    else:  # the same rows, the same size: only the content checksum tells
        swapped = []
        for line in rows:
            row = json.loads(line)
            row["chosen"], row["rejected"] = row["rejected"], row["chosen"]
            swapped.append(json.dumps(row, separators=(",", ":"), ensure_ascii=False))
        size = data.stat().st_size
        data.write_text("\n".join(swapped) + "\n")
        assert data.stat().st_size == size
        said = "content checksum"
    for resume in (False, True):
        with pytest.raises(OutputFolderError) as exc:
            run_folder.claim(plan, resume=resume, overwrite=False, command="spo train x")
        message = str(exc.value)
        assert "\n" not in message and f"the data changed since this run started (data.train.0 ({data}): " in message
        assert said in message and "--accept-data-change" in message and "--overwrite" in message
        assert change == "fewer-rows" or ("rows" not in message and "size" not in message)
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before

    resumed = run_folder.claim(plan, resume=True, overwrite=False, command="spo train x", accept_data_change=True)
    assert resumed == str(out / "checkpoint-6")
    info = run_folder.read_run_info(out)
    assert said in info["sessions"][-1]["data_changed"][0]
    assert info["data_sources"]["data.train.0"]["checksum"] == file_checksum(data)  # the new record
    assert run_folder.claim(plan, resume=True, overwrite=False, command="spo train x") == str(out / "checkpoint-6")


def test_a_run_recorded_before_fingerprints_continues(plan_for, data: Path):
    plan = plan_for("spo", f"data.train.0.path={data}")
    out = _stopped_run(plan)
    info = run_folder.read_run_info(out)
    del info["data_sources"]
    (out / "run.json").write_text(json.dumps(info))
    data.write_text("\n".join(_rows(data)[:10]) + "\n")
    assert run_folder.claim(plan, resume=True, overwrite=False, command="spo train x") == str(out / "checkpoint-6")
    assert run_folder.read_run_info(out)["data_sources"]["data.train.0"]["rows"] == 10  # recorded from now on
