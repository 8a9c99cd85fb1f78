"""A fast non-cryptographic checksum of a file, for checkpoint seals: cheap enough for a 120 GB checkpoint.

`xxh3_64` (the `xxhash` package, which `datasets` depends on) where installed, else zlib's `crc32`; the seal
records which one wrote it, and a checkpoint sealed with one is verified with the same one. Files are read in
8 MiB chunks, so memory stays flat whatever their size. It guards against damage (a truncated copy, zeroed or
flipped bytes, a lost write), not against anyone forging a file.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from pathlib import Path

CHUNK = 8 << 20


def _xxh3() -> Callable[[], object] | None:
    try:
        import xxhash
    except ImportError:
        return None
    return xxhash.xxh3_64


def default_algorithm() -> str:
    """The checksum new seals use: `xxh3_64` when `xxhash` is installed, else `crc32`."""
    return "xxh3_64" if _xxh3() is not None else "crc32"


def available(algorithm: str) -> bool:
    return algorithm == "crc32" or (algorithm == "xxh3_64" and _xxh3() is not None)


def file_checksum(path: Path, algorithm: str | None = None) -> str:
    """The checksum of the file at `path` as hex, read in `CHUNK`-sized pieces."""
    algorithm = algorithm or default_algorithm()
    make = _xxh3()
    if algorithm not in ("crc32", "xxh3_64") or (algorithm == "xxh3_64" and make is None):
        raise ValueError(f"checksum {algorithm!r} is not available here")
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    crc, digest = 0, make() if algorithm == "xxh3_64" else None  # type: ignore[misc]
    with Path(path).open("rb", buffering=0) as handle:
        while size := handle.readinto(buffer):
            if digest is not None:
                digest.update(view[:size])  # type: ignore[attr-defined]
            else:
                crc = zlib.crc32(view[:size], crc)
    return digest.hexdigest() if digest is not None else f"{crc:08x}"  # type: ignore[attr-defined]


def bytes_checksum(data: bytes, algorithm: str | None = None) -> str:
    """The checksum of `data` as hex (the same hashes as `file_checksum`)."""
    algorithm = algorithm or default_algorithm()
    make = _xxh3()
    if algorithm == "xxh3_64" and make is not None:
        return make(data).hexdigest()  # type: ignore[call-arg,attr-defined]
    if algorithm == "crc32":
        return f"{zlib.crc32(data):08x}"
    raise ValueError(f"checksum {algorithm!r} is not available here")
