"""One line for a failed file-system call, naming what is in the way rather than an errno.

`mkdir -p runs/a` where `runs` is a file fails with `[Errno 17] File exists` or `[Errno 20] Not a directory`,
neither of which says which path is the problem. `reason` says `runs is a file, not a folder` instead.
"""

from __future__ import annotations

import errno
from pathlib import Path


def file_in_the_way(path: Path | str) -> Path | None:
    """The nearest of `path`'s parent folders that exists but is not a folder (a file), or None."""
    for parent in Path(path).parents:
        try:
            if parent.exists() and not parent.is_dir():
                return parent
        except OSError:
            return None
    return None


def reason(exc: OSError) -> str:
    """Why `exc` happened, in words: `<path> is a file, not a folder` when a file stands where a folder must be,
    else the system's own text (`Permission denied`)."""
    if exc.errno in (errno.ENOTDIR, errno.EEXIST) and exc.filename:
        name = Path(exc.filename)
        blocker = file_in_the_way(name)
        if blocker is None and exc.errno == errno.EEXIST and name.exists() and not name.is_dir():
            blocker = name  # mkdir of a path that is a file
        if blocker is not None:
            return f"{blocker} is a file, not a folder"
    return exc.strerror or str(exc)
