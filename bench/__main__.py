"""`python -m bench`: the performance bench of spo-align.

    python -m bench run [--size real|full|toy|gpu|gpu-cpu] [--parts preference,sft,logp] [--rounds N]
                        [--work-dir DIR] [--results-dir DIR] [--budget-s S]
    python -m bench profile RUN [--size real|full|toy]   (one preference run under torch.profiler)
    python -m bench gemm [--threads 2] [--width 256]   (matrix-product rate against row count)
    python -m bench rows [--repeats 3] [--threads 2]    (real model: rows of one pair vs one row)
    python -m bench env OUT.json         (the machine's facts, for the GPU check)
    python -m bench gpu-report --size gpu --work-dir DIR --results-dir DIR [--command TEXT]
    python -m bench worker SPEC OUT      (internal: one job in a fresh process)

`run` writes `<results-dir>/<size>.json` and `<results-dir>/<size>.md` (default bench/results/). The GPU
check's sizes (gpu, gpu-cpu) run their own plan (bench/gpu_plan.py; `--parts` does not apply) and are
normally started by bench/gpu_check.sh, which also writes the work folder's phases and environment facts.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
from pathlib import Path

logger = logging.getLogger("bench")
NOT_ALL_SUCCEEDED = 3
"""`gpu-report`'s exit status when the report was written but some phase or run did not succeed."""


def _parser() -> argparse.ArgumentParser:
    from bench.config import SIZES
    from bench.suite import PARTS

    parser = argparse.ArgumentParser(prog="python -m bench", description="spo-align performance bench")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the bench and write the table")
    run.add_argument(
        "--size",
        choices=sorted(SIZES),
        default="real",
        help="real: SmolLM2-135M-Instruct with LoRA vs TRL (the main case); full: a random 5M-parameter model, "
        "full fine-tuning; toy: seconds; gpu: the GPU check's runs; gpu-cpu: the same pipeline on CPU at toy size",
    )
    run.add_argument(
        "--parts", default=None, help=f"comma-separated subset of {','.join(PARTS)} (default: the size's own)"
    )
    run.add_argument("--rounds", type=int, default=None, help="fresh-process repetitions per run (default: size's)")
    run.add_argument(
        "--runs", default=None, help="comma-separated preference runs, in the order each round runs them (default: the size's)"
    )
    run.add_argument(
        "--reuse",
        type=Path,
        default=None,
        help="an earlier report (JSON) of the same size whose results are kept for the runs not run now",
    )
    run.add_argument("--work-dir", type=Path, default=None, help="scratch folder (model, data, run outputs)")
    run.add_argument("--results-dir", type=Path, default=None, help="where the JSON and Markdown go")
    run.add_argument(
        "--budget-s", type=float, default=None, help="stop starting jobs after this many seconds (they are listed as skipped)"
    )
    prof = sub.add_parser("profile", help="one preference run under torch.profiler: top operators by self CPU time")
    prof.add_argument("run", help="one of the size's runs: trl | spo-padded | spo-packed | spo-packed-precompute")
    prof.add_argument("--size", choices=sorted(SIZES), default="real")
    prof.add_argument("--rows", type=int, default=25, help="operators to list")
    prof.add_argument("--steps", type=int, default=None, help="profile only the first N optimizer steps' pairs")
    prof.add_argument("--memory", action="store_true", help="also record allocations (slower) and list operators by memory")
    prof.add_argument("--work-dir", type=Path, default=None)
    prof.add_argument("--out", type=Path, default=None, help="file for the table (default: bench/results/profile-RUN.txt)")
    gemm = sub.add_parser("gemm", help="matrix-product rate against row count (explains row-by-row costs)")
    gemm.add_argument("--threads", type=int, default=2)
    gemm.add_argument("--width", type=int, default=256)
    rows = sub.add_parser("rows", help="real model: a micro-batch forwarded as rows of one pair vs one row")
    rows.add_argument("--repeats", type=int, default=3)
    rows.add_argument("--threads", type=int, default=2)
    env = sub.add_parser("env", help="write the machine's facts (device, versions) as JSON")
    env.add_argument("out", type=Path)
    report = sub.add_parser("gpu-report", help="write the GPU check's report from its work folder")
    report.add_argument("--size", choices=sorted(n for n, c in SIZES.items() if c.gpu is not None), default="gpu")
    report.add_argument("--work-dir", type=Path, required=True)
    report.add_argument("--results-dir", type=Path, required=True)
    report.add_argument(
        "--command", dest="shown_command", default=None, help="the command to print in the report (default: this one)"
    )
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
    if args.command == "rows":
        from bench.row_split import row_split_table

        print(row_split_table(args.repeats, args.threads))
        return 0
    if args.command == "worker":
        from bench.worker import main as worker_main

        worker_main(args.spec, args.out)
        return 0
    if args.command == "env":
        from bench.env_facts import write_facts

        print(json.dumps(write_facts(args.out), indent=1))
        return 0
    if args.command == "gpu-report":
        from bench.config import SIZES
        from bench.gpu_report import build_gpu_report, write_gpu_report

        config = SIZES[args.size]
        command = args.shown_command or "python -m bench " + " ".join(shlex.quote(a) for a in argv)
        report = build_gpu_report(config, args.work_dir, command)
        _, md_path = write_gpu_report(report, args.results_dir)
        print(md_path.read_text(encoding="utf-8"))
        return 0 if report["succeeded"] else NOT_ALL_SUCCEEDED

    from bench.config import SIZES, with_dirs
    from bench.report import build_report, write_report
    from bench.suite import PARTS, run_bench

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if args.command == "profile":
        from bench.profile import profile_run, write_profile

        config = with_dirs(SIZES[args.size], args.work_dir, None, None)
        text = profile_run(config, args.run, args.rows, args.steps, args.memory)
        out = write_profile(text, args.out or config.results_dir / f"profile-{args.run}.txt")
        print(text)
        logger.info("wrote %s", out)
        return 0
    if SIZES[args.size].gpu is not None:
        return _run_gpu_check(args, argv)
    parts = list(SIZES[args.size].parts) if args.parts is None else [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        logger.error("unknown part(s) %s; choose from %s", ", ".join(unknown), ", ".join(PARTS))
        return 2
    if args.rounds is not None and args.rounds < 1:
        logger.error("--rounds must be >= 1")
        return 2
    config = with_dirs(SIZES[args.size], args.work_dir, args.results_dir, args.rounds)
    if args.runs is not None:
        import dataclasses

        config = dataclasses.replace(config, runs=tuple(r.strip() for r in args.runs.split(",") if r.strip()))
    command = "python -m bench " + " ".join(shlex.quote(a) for a in argv)
    reused = None
    if args.reuse is not None:
        earlier = json.loads(args.reuse.read_text(encoding="utf-8"))
        if earlier.get("size") != config.name:
            logger.error("--reuse %s holds a %s report, not %s", args.reuse, earlier.get("size"), config.name)
            return 2
        reused = earlier["raw"]
        command += f"  (kept from the earlier report, runs not run now: {earlier['command']})"

    def interim(raw: dict) -> None:  # keep what was measured if the run is interrupted
        write_report(build_report(config, raw, command + "  (interrupted: partial results)"), config.results_dir)

    raw = run_bench(config, parts, budget_s=args.budget_s, progress=interim, reused=reused)  # type: ignore[arg-type]
    report = build_report(config, raw, command)
    json_path, md_path = write_report(report, config.results_dir)
    print(md_path.read_text(encoding="utf-8"))
    logger.info("wrote %s and %s", json_path, md_path)
    return 0


def _run_gpu_check(args: argparse.Namespace, argv: list[str]) -> int:
    from bench.config import SIZES, with_dirs
    from bench.gpu_plan import run_gpu_bench
    from bench.gpu_report import build_gpu_report, write_gpu_report

    config = with_dirs(SIZES[args.size], args.work_dir, args.results_dir, args.rounds)
    command = os.environ.get("GPU_CHECK_COMMAND") or "python -m bench " + " ".join(shlex.quote(a) for a in argv)

    def report(_raw: dict) -> None:  # after every run, so a cut-off check keeps what it measured
        write_gpu_report(build_gpu_report(config, config.work_dir, command), config.results_dir)

    run_gpu_bench(config, args.budget_s, on_progress=report)
    _, md_path = write_gpu_report(build_gpu_report(config, config.work_dir, command), config.results_dir)
    print(md_path.read_text(encoding="utf-8"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
