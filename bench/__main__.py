"""`python -m bench`: the performance bench of spo-align.

    python -m bench run [--size full|toy|gpu] [--parts preference,sft,logp] [--rounds N]
                        [--work-dir DIR] [--results-dir DIR] [--budget-s S]
    python -m bench profile RUN [--size full|toy]   (one preference run under torch.profiler)
    python -m bench gemm [--threads 2] [--width 256]   (matrix-product rate against row count)
    python -m bench worker SPEC OUT      (internal: one job in a fresh process)

`run` writes `<results-dir>/<size>.json` and `<results-dir>/<size>.md` (default bench/results/).
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path

logger = logging.getLogger("bench")


def _parser() -> argparse.ArgumentParser:
    from bench.config import SIZES
    from bench.suite import PARTS

    parser = argparse.ArgumentParser(prog="python -m bench", description="spo-align performance bench")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the bench and write the table")
    run.add_argument("--size", choices=sorted(SIZES), default="full", help="full: the CPU bench; toy: seconds; gpu: the GPU check's MFU runs")
    run.add_argument(
        "--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)} (default: all)"
    )
    run.add_argument("--rounds", type=int, default=None, help="fresh-process repetitions per run (default: size's)")
    run.add_argument("--work-dir", type=Path, default=None, help="scratch folder (model, data, run outputs)")
    run.add_argument("--results-dir", type=Path, default=None, help="where the JSON and Markdown go")
    run.add_argument(
        "--budget-s", type=float, default=None, help="stop starting jobs after this many seconds (they are listed as skipped)"
    )
    prof = sub.add_parser("profile", help="one preference run under torch.profiler: top operators by self CPU time")
    prof.add_argument("run", help="trl | spo-padded | spo-packed | spo-packed-precompute")
    prof.add_argument("--size", choices=sorted(SIZES), default="full")
    prof.add_argument("--rows", type=int, default=25, help="operators to list")
    prof.add_argument("--work-dir", type=Path, default=None)
    prof.add_argument("--out", type=Path, default=None, help="file for the table (default: bench/results/profile-RUN.txt)")
    gemm = sub.add_parser("gemm", help="matrix-product rate against row count (explains row-by-row costs)")
    gemm.add_argument("--threads", type=int, default=2)
    gemm.add_argument("--width", type=int, default=256)
    worker = sub.add_parser("worker", help="internal: run one job spec in this process")
    worker.add_argument("spec", type=Path)
    worker.add_argument("out", type=Path)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    if args.command == "gemm":
        from bench.gemm import gemm_table

        print(gemm_table(args.threads, args.width))
        return 0
    if args.command == "worker":
        from bench.worker import main as worker_main

        worker_main(args.spec, args.out)
        return 0

    from bench.config import SIZES, with_dirs
    from bench.report import build_report, write_report
    from bench.suite import PARTS, run_bench

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if args.command == "profile":
        from bench.profile import profile_run, write_profile

        config = with_dirs(SIZES[args.size], args.work_dir, None, None)
        text = profile_run(config, args.run, args.rows)
        out = write_profile(text, args.out or config.results_dir / f"profile-{args.run}.txt")
        print(text)
        logger.info("wrote %s", out)
        return 0
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        logger.error("unknown part(s) %s; choose from %s", ", ".join(unknown), ", ".join(PARTS))
        return 2
    if args.rounds is not None and args.rounds < 1:
        logger.error("--rounds must be >= 1")
        return 2
    config = with_dirs(SIZES[args.size], args.work_dir, args.results_dir, args.rounds)
    command = "python -m bench " + " ".join(shlex.quote(a) for a in argv)

    def interim(raw: dict) -> None:  # keep what was measured if the run is interrupted
        write_report(build_report(config, raw, command + "  (interrupted: partial results)"), config.results_dir)

    raw = run_bench(config, parts, budget_s=args.budget_s, progress=interim)  # type: ignore[arg-type]
    report = build_report(config, raw, command)
    json_path, md_path = write_report(report, config.results_dir)
    print(md_path.read_text(encoding="utf-8"))
    logger.info("wrote %s and %s", json_path, md_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
