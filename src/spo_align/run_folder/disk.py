"""Telling a failed write (full disk, quota, read-only or unwritable folder) from other failures.

Libraries report a full disk differently: Python raises `OSError(ENOSPC)`, safetensors a `SafetensorError`
whose text carries "No space left on device (os error 28)", and torch.save a `RuntimeError` about its
stream writer with no errno at all. `write_failure` recognises each and says it in one line, with the
free space left where the folder is, so that `spo train` can report it without a traceback.
"""

from __future__ import annotations

import errno
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

_ERRNOS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large for this filesystem or limit",
    errno.EROFS: "read-only filesystem",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EIO: "input/output error",
}
_TEXTS = re.compile(
    r"No space left on device|os error 28|Disk quota exceeded|os error 122|File too large|os error 27|"
    r"Read-only file system|os error 30|PytorchStreamWriter failed|file write failed|iostream error|unexpected pos",
    re.IGNORECASE,
)


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def is_write_failure(exc: BaseException) -> bool:
    for item in _chain(exc):
        if isinstance(item, OSError) and item.errno in _ERRNOS:
            return True
        if _TEXTS.search(str(item)):
            return True
    return False


def _free(path: Path) -> str | None:
    for candidate in (Path(path), *Path(path).parents):
        if candidate.exists():
            try:
                free = shutil.disk_usage(candidate).free
            except OSError:
                return None
            for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
                if free < 1024 or unit == "TiB":
                    return f"{free:.0f} {unit}" if unit == "B" else f"{free:.1f} {unit}"
                free /= 1024
    return None


def write_failure(exc: BaseException, output_dir: Path) -> str | None:
    """One line for a failed write (what failed, where, the free space there), or None for other failures."""
    if not is_write_failure(exc):
        return None
    reason, where = None, None
    for item in _chain(exc):
        if isinstance(item, OSError) and item.errno in _ERRNOS:
            reason, where = _ERRNOS[item.errno], item.filename
            break
    if reason is None:
        text = next((str(item) for item in _chain(exc) if _TEXTS.search(str(item))), str(exc))
        reason = f"a write failed ({text.strip().splitlines()[0][:200]})"
    free = _free(Path(where) if where else Path(output_dir))
    place = f": {where}" if where else f" in {output_dir}"
    room = f"; {free} free there" if free is not None else ""
    return (
        f"{reason}{place}{room}. The run in {output_dir} is not finished; make room (or fix the folder) and run "
        "the same command again to continue from its last complete checkpoint"
    )
