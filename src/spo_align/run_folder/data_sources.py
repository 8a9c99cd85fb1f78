"""What each data source held when a run read it, so that a continued run notices data replaced mid-run.

A run's recipe names its data by path (or hub id); what the path holds is recorded separately, in run.json's
`data_sources` when the folder is claimed: per source (`data.train.0`, `data.eval.0`, ...) its rows as read
(`data.sources.load_source`, before `max_samples`), and
- a local file: its size and an `xxh3_64` of all its bytes (crc32 without xxhash; `checksums.py`);
- a local dataset folder (`save_to_disk`): its files' total size and one checksum over their names and bytes;
- a hub dataset: a checksum of a sample of 64 rows spread over the split (the hub's files are not local).

A continued run compares the sources as they are now with the record: any difference (rows, size, checksum) is
refused in one line naming the source and what changed, unless `spo train --accept-data-change` (then the new
record is kept and the session notes the change). A record written by a version before this one is absent:
nothing is compared, and the sources are recorded from now on.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from spo_align.run_folder.checksums import bytes_checksum, default_algorithm, file_checksum

if TYPE_CHECKING:
    from spo_align.recipe.resolve import RunPlan

SAMPLE_ROWS = 64
_COMPARED = ("rows", "bytes", "checksum")


def _folder_checksum(folder: Path, algorithm: str) -> tuple[int, str]:
    total, parts = 0, []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        total += path.stat().st_size
        parts.append(f"{path.relative_to(folder)}:{file_checksum(path, algorithm)}")
    return total, bytes_checksum("\n".join(parts).encode(), algorithm)


def _sample_checksum(ds: Any, algorithm: str) -> str:
    n = len(ds)
    picks = sorted({(i * n) // SAMPLE_ROWS for i in range(min(SAMPLE_ROWS, n))})
    return bytes_checksum(json.dumps([ds[i] for i in picks], sort_keys=True, default=str).encode(), algorithm)


def fingerprint(plan: RunPlan) -> dict[str, dict[str, Any]]:
    """Each data source of the plan as it is now (see the module), keyed `data.train.0`, `data.eval.0`, ..."""
    from spo_align.data.sources import ROW_COLUMN, load_source, resolve_source_path

    algorithm = default_algorithm()
    out: dict[str, dict[str, Any]] = {}
    data = plan.recipe.data
    for split, sources in (("train", data.train), ("eval", data.eval)):
        for index, source in enumerate(sources):
            location = Path(resolve_source_path(source, plan.base_dir))
            ds = load_source(source, plan.base_dir)
            entry: dict[str, Any] = {"path": source.path, "split": source.split, "rows": len(ds), "algorithm": algorithm}
            if location.is_file():
                entry.update(kind="file", bytes=location.stat().st_size, checksum=file_checksum(location, algorithm))
            elif location.is_dir():
                size, digest = _folder_checksum(location, algorithm)
                entry.update(kind="folder", bytes=size, checksum=digest)
            else:
                own = ds.remove_columns(ROW_COLUMN) if ROW_COLUMN in ds.column_names else ds
                entry.update(kind="hub", bytes=None, checksum=_sample_checksum(own, algorithm), sample_rows=SAMPLE_ROWS)
            out[f"data.{split}.{index}"] = entry
    return out


def _size(value: Any) -> str:
    if not isinstance(value, int):
        return str(value)
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if value >= scale:
            return f"{value / scale:.1f} {unit}"
    return f"{value} B"


def changes(recorded: Any, current: dict[str, dict[str, Any]]) -> list[str]:
    """`data.train.0 (path): rows 4000 -> 1000, size 1.2 MB -> 0.3 MB, checksum a -> b` for every source that is
    not what the run recorded; [] when the same, or when nothing was recorded (a run of an older version)."""
    if not isinstance(recorded, dict):
        return []
    lines = []
    for key, now in current.items():
        before = recorded.get(key)
        if not isinstance(before, dict):
            continue  # a source the record does not know: the recipe hash decides about sources added
        if before.get("algorithm") != now.get("algorithm") or before.get("kind") != now.get("kind"):
            compared: tuple[str, ...] = ("rows", "bytes")  # checksums of another kind cannot be compared
        else:
            compared = _COMPARED
        what = []
        for field in compared:
            old, new = before.get(field), now.get(field)
            if old != new:
                shown = (_size(old), _size(new)) if field == "bytes" else (str(old)[:16], str(new)[:16])
                name = "size" if field == "bytes" else "content checksum" if field == "checksum" else field
                what.append(f"{name} {shown[0]} -> {shown[1]}")
        if what:
            lines.append(f"{key} ({now.get('path')}): {', '.join(what)}")
    return lines
