"""What sealing a checkpoint costs next to writing it: real `spo train` runs under DeepSpeed ZeRO-3, 2 ranks.

    python -m bench.seal_cost --work-dir DIR [--sizes small,large] [--steps 6] [--save-steps 2]

For each model size this writes a tiny-vocabulary Llama, trains it with tests/data/recipes/spo_zero3.yaml under
the `deepspeed` launcher (2 CPU ranks over gloo; tests/data/gloo_only on PYTHONPATH, as in the tests, so that
DeepSpeed does not compile its shared-memory op), a checkpoint every `--save-steps`, and reads what each seal
recorded (`run_folder/checkpoints.py`): the checkpoint's bytes, `write_s` (rank 0, from the step's end to its files
written) and `seal_s` (from there to the seal written: waiting for the other ranks, flushing, the manifest).
It prints one markdown row per checkpoint and the median per size. Timings on a shared machine are noisy:
say where they were taken.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "tests" / "data" / "recipes" / "spo_zero3.yaml"
GLOO_ONLY = REPO / "tests" / "data" / "gloo_only"
# (hidden, layers, heads, intermediate): ~0.8 M and ~25 M parameters, fp32
SIZES = {"small": (128, 4, 4, 352), "large": (512, 8, 8, 1408)}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_size(name: str, work: Path, steps: int, save_steps: int) -> list[dict]:
    from spo_align.tiny import TinyModelShape, write_tiny_model

    hidden, layers, heads, intermediate = SIZES[name]
    model = work / f"model-{name}"
    if not model.exists():
        shape = TinyModelShape(
            hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=intermediate
        )
        write_tiny_model(model, shape)
    out = work / f"run-{name}"
    env = {
        **os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": str(_free_port()),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(GLOO_ONLY), os.environ.get("PYTHONPATH")])),
    }
    command = [
        sys.executable, "-m", "spo_align.cli", "train", str(RECIPE), "--overwrite",
        "--set", f"model.name_or_path={model}", "--set", f"output.dir={out}", "--set", "distributed.launcher=deepspeed",
        "--set", f"training.max_steps={steps}", "--set", f"training.save_steps={save_steps}",
        "--set", f"training.save_total_limit={steps}", "--set", "data.train.0.max_samples=16",
    ]
    log = work / f"run-{name}.log"
    with log.open("w") as stream:
        code = subprocess.run(command, env=env, stdout=stream, stderr=subprocess.STDOUT).returncode
    if code != 0:
        raise SystemExit(f"{name}: spo train exited {code}; see {log}")
    rows = []
    for seal in sorted(out.glob("checkpoint-*/spo_checkpoint.json"), key=lambda p: int(p.parent.name.split("-")[1])):
        body = json.loads(seal.read_text())
        rows.append({
            "size": name, "checkpoint": seal.parent.name, "mb": sum(body["files"].values()) / 1e6,
            "write_s": body.get("write_s"), "seal_s": body.get("seal_s"),
        })
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.seal_cost", description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", type=Path, required=True)
    parser.add_argument("--sizes", default="small,large")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--save-steps", type=int, default=2)
    args = parser.parse_args(argv)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    rows = [row for name in args.sizes.split(",") for row in run_size(name, args.work_dir, args.steps, args.save_steps)]
    print("| model | checkpoint | MB | write s | seal s | seal / write |")
    print("|---|---|---:|---:|---:|---:|")
    for row in rows:
        ratio = row["seal_s"] / row["write_s"] if row["write_s"] else float("nan")
        print(f"| {row['size']} | {row['checkpoint']} | {row['mb']:.1f} | {row['write_s']:.3f} | {row['seal_s']:.3f} | {ratio:.0%} |")
    for name in args.sizes.split(","):
        mine = [r for r in rows if r["size"] == name]
        write = statistics.median(r["write_s"] for r in mine)
        seal = statistics.median(r["seal_s"] for r in mine)
        print(f"median {name}: {mine[0]['mb']:.1f} MB, write {write:.3f} s, seal {seal:.3f} s ({seal / write:.0%} of the write)")


if __name__ == "__main__":
    main()
