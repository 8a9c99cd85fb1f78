"""Write the embedded tiny task's data to data/tiny/ (deterministic: same bytes on every run).

    python scripts/make_tiny_data.py            # (re)write data/tiny/
    python scripts/make_tiny_data.py --check    # exit 1 if the committed files differ from a fresh build

What the files hold and why the teacher drops the carry: docs/tiny.md and `spo_align.tiny.make_tiny_data`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from spo_align.tiny import TinyDataSpec, make_tiny_data

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "data" / "tiny"


def render(rows: list[dict]) -> str:
    return "".join(json.dumps(row, separators=(",", ":"), sort_keys=False) + "\n" for row in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: data/tiny)")
    parser.add_argument("--check", action="store_true", help="compare with the files in --out, write nothing")
    args = parser.parse_args(argv)

    files = {name: render(rows) for name, rows in make_tiny_data(TinyDataSpec()).items()}
    if args.check:
        stale = [name for name, text in files.items() if not (args.out / name).is_file()
                 or (args.out / name).read_text(encoding="utf-8") != text]
        for name in stale:
            print(f"{args.out / name}: differs from a fresh build", file=sys.stderr)
        return 1 if stale else 0
    args.out.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (args.out / name).write_text(text, encoding="utf-8")
        print(f"wrote {args.out / name} ({text.count(chr(10))} rows)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
