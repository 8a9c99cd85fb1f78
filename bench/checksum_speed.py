"""How fast a checkpoint file is checksummed (run_folder.checksums), against a plain read of the same file.

    python bench/checksum_speed.py FILE [ROUNDS]

Prints, per round, the seconds and MB/s of: a plain read in the same 8 MiB chunks (the floor), xxh3_64, crc32.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from spo_align.run_folder.checksums import CHUNK, file_checksum


def _read_only(path: Path) -> None:
    buffer = bytearray(CHUNK)
    with path.open("rb", buffering=0) as handle:
        while handle.readinto(buffer):
            pass


def main() -> None:
    path = Path(sys.argv[1])
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    mb = path.stat().st_size / 2**20
    for round_ in range(1, rounds + 1):
        for name, run in (
            ("read only", lambda: _read_only(path)),
            ("xxh3_64", lambda: file_checksum(path, "xxh3_64")),
            ("crc32", lambda: file_checksum(path, "crc32")),
        ):
            started = time.perf_counter()
            run()
            seconds = time.perf_counter() - started
            print(f"round {round_} {name:9s}: {seconds:.2f} s, {mb / seconds:.0f} MB/s")


if __name__ == "__main__":
    main()
