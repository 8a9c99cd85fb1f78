"""Bench sizes: the workload every engine runs, and how often each run is repeated."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from bench.pairs import QWEN25_1P5B, LengthModel, ModelShape


@dataclass(frozen=True)
class Workload:
    """The same work for every engine: model, pairs, pairs per optimizer step, loss, optimizer."""

    shape: ModelShape = field(default_factory=ModelShape)
    lengths: LengthModel = field(default_factory=LengthModel)
    n_pairs: int = 24
    """One epoch over these pairs; with `pairs_per_step` this fixes the optimizer steps of every run."""
    pairs_per_device: int = 8
    """Pairs per micro-batch (per forward/backward)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    sft_rows: int = 24
    sft_rows_per_step: int = 8
    learning_rate: float = 5e-6
    beta: float = 0.1
    loss: str = "dpo"
    """spo runs' loss: dpo (sigmoid, label_smoothing 0: TRL's own loss, for a like-for-like comparison) or spo."""
    seed: int = 42
    threads: int = 2
    device: str = "cpu"
    dtype: str = "float32"
    """Recipe dtype name (float32 | bfloat16)."""
    attention: str = "sdpa"
    pack_length: int | None = None
    """Tokens per packed row; None: the recipe's default for the device (see `data.pack_length`)."""

    @property
    def pairs_per_step(self) -> int:
        return self.pairs_per_device * self.grad_accum

    @property
    def steps(self) -> int:
        return self.n_pairs // self.pairs_per_step

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_json(data: dict[str, Any]) -> Workload:
        data = dict(data)
        data["shape"] = ModelShape(**data["shape"])
        data["lengths"] = LengthModel(**data["lengths"])
        return Workload(**data)


@dataclass(frozen=True)
class LogpWork:
    """The log-prob step at Qwen2.5's vocabulary: hidden states of `rows` x `length` tokens."""

    vocab_size: int = 152_064
    hidden_size: int = 128
    rows: int = 4
    length: int = 512
    prompt_share: float = 0.25
    """Leading share of each row that is prompt (not scored), as in a preference batch."""
    chunk_size: int | None = None
    """Tokens per LM-head chunk; None: `spo_align.losses.DEFAULT_CHUNK_SIZE`."""
    threads: int = 2
    seed: int = 0
    rounds: int = 1
    """Fresh processes per method. The step's memory is set by tensor sizes, not by machine load, so one
    round measures it; the bench's round count still caps this."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class BenchConfig:
    workload: Workload = field(default_factory=Workload)
    logp: LogpWork = field(default_factory=LogpWork)
    rounds: int = 3
    """Fresh-process repetitions of every run; the table shows medians."""
    attentions: tuple[str, ...] = ("sdpa",)
    """Attention kernels to compare (GPU check); one entry: the CPU bench's four runs (a)-(d)."""
    work_dir: Path = Path("bench/results/tmp")
    results_dir: Path = Path("bench/results")
    name: str = "cpu"
    job_timeout_s: float = 900.0
    keep_going: bool = False
    """Record a failed job in the report and go on (GPU check: one kernel failing must not hide the others)."""


FULL = BenchConfig()

TOY = BenchConfig(
    workload=Workload(
        shape=ModelShape(
            vocab_size=512,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            intermediate_size=64,
            max_position_embeddings=256,
        ),
        lengths=LengthModel(prompt_median=12, response_median=24, max_length=128),
        n_pairs=8,
        pairs_per_device=4,
        sft_rows=8,
        sft_rows_per_step=4,
        threads=1,
    ),
    logp=LogpWork(vocab_size=4096, hidden_size=16, rows=2, length=64, chunk_size=32, threads=1),
    rounds=2,
    name="toy",
)

# The GPU check (bench/gpu_check.sh): full fine-tuning of a random-weight model with Qwen2.5-1.5B's shape in
# bf16, packed SPO under each attention kernel that imports, against TRL's DPOTrainer. One round: the device
# time is short, and GPU step times vary far less than a shared CPU's.
GPU = BenchConfig(
    workload=Workload(
        shape=QWEN25_1P5B,
        lengths=LengthModel(max_length=1024),
        n_pairs=160,
        pairs_per_device=4,
        grad_accum=4,
        learning_rate=1e-6,
        loss="spo",
        threads=8,
        device="cuda",
        dtype="bfloat16",
    ),
    rounds=1,
    attentions=("sdpa", "flex_attention", "flash_attention_2"),
    name="gpu",
    job_timeout_s=150.0,
    keep_going=True,
)

SIZES = {"full": FULL, "toy": TOY, "gpu": GPU}


def with_dirs(config: BenchConfig, work_dir: Path | None, results_dir: Path | None, rounds: int | None) -> BenchConfig:
    changes: dict[str, Any] = {}
    if work_dir is not None:
        changes["work_dir"] = Path(work_dir)
    if results_dir is not None:
        changes["results_dir"] = Path(results_dir)
    if rounds is not None:
        changes["rounds"] = rounds
    return replace(config, **changes)
