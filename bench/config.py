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
    model: str | None = None
    """A packaged real model (`spo packaged-model NAME`, e.g. smollm2-135m-instruct) with its own tokenizer;
    None: the random-weight model of `shape` with the bench's word-level tokenizer."""
    lora_r: int | None = None
    """LoRA rank on every linear layer of both engines (None: full fine-tuning). With LoRA the reference is
    the policy with its adapter disabled on both sides (TRL does so for a peft model, spo for adapter runs)."""
    lora_alpha: float = 32.0
    gradient_checkpointing: bool = False
    """Set explicitly on both sides: TRL 1.x turns it on by default, spo recipes leave it off."""

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
    """Tokens per LM-head chunk; None: `spo_align.train.sequence_logps.DEFAULT_CHUNK_SIZE`."""
    threads: int = 2
    seed: int = 0
    rounds: int = 1
    """Fresh processes per method. The step's memory is set by tensor sizes, not by machine load, so one
    round measures it; the bench's round count still caps this."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class GpuCheck:
    """What the GPU check (bench/gpu_check.sh) runs beyond the shared workload, and each run's time cap."""

    attentions: tuple[str, ...] = ("sdpa", "flex_attention", "flash_attention_2")
    """Kernels for packed SPO; each runs only where it imports (flash_attention_2 needs flash-attn)."""
    peak_size: int = 8192
    """Square matrix product that measures the card's dense peak (the MFU denominator)."""
    peak_dtype: str = "bfloat16"
    peak_repeats: int = 20
    check_pairs: int = 8
    """Pairs whose log-probs are compared between the padded and the packed layout."""
    lora_r: int = 64
    lora_alpha: float = 128.0
    lora_learning_rate: float = 1e-4
    gen_prompts: int = 32
    gen_batch: int = 16
    gen_new_tokens: int = 256
    gen_rounds: int = 2
    caps: tuple[tuple[str, float], ...] = (
        ("peak", 45.0),
        ("trl", 120.0),
        ("spo", 90.0),
        ("spo-compiled", 150.0),
        ("check", 75.0),
        ("check-compiled", 100.0),
        ("generate", 90.0),
    )
    """Seconds each kind of run may take (its process start, model load and compilation included):
    'compiled' is flex_attention, whose kernels torch compiles on first use."""

    def cap(self, kind: str) -> float:
        return dict(self.caps)[kind]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_json(data: dict[str, Any]) -> GpuCheck:
        data = dict(data)
        data["attentions"] = tuple(data["attentions"])
        data["caps"] = tuple((str(kind), float(seconds)) for kind, seconds in data["caps"])
        return GpuCheck(**data)


@dataclass(frozen=True)
class BenchConfig:
    workload: Workload = field(default_factory=Workload)
    runs: tuple[str, ...] = ("trl", "spo-padded", "spo-packed", "spo-packed-precompute")
    """Preference runs of `python -m bench run`, in the order each round runs them (TRL first, then spo's)."""
    parts: tuple[str, ...] = ("logp", "preference", "sft")
    """Parts `python -m bench run` runs when --parts is not given."""
    logp: LogpWork = field(default_factory=LogpWork)
    rounds: int = 3
    """Fresh-process repetitions of every run; the table shows medians."""
    work_dir: Path = Path("bench/results/tmp")
    results_dir: Path = Path("bench/results")
    name: str = "cpu"
    job_timeout_s: float = 900.0
    keep_going: bool = False
    """Record a failed job in the report and go on (GPU check: one kernel failing must not hide the others)."""
    gpu: GpuCheck | None = None
    """Set for the GPU check's sizes: `python -m bench run` then runs its plan (bench/gpu_plan.py)."""


FULL = BenchConfig()

TOY_SHAPE = ModelShape(
    vocab_size=512,
    hidden_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=2,
    intermediate_size=64,
    max_position_embeddings=256,
)

TOY = BenchConfig(
    workload=Workload(
        shape=TOY_SHAPE,
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
# bf16 on one GPU. One process per run; each run's first optimizer step is its warm-up and the figures are
# medians over the 9 steps after it (16 pairs per step, 160 pairs, one epoch), so one round suffices.
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
    name="gpu",
    keep_going=True,
    gpu=GpuCheck(),
)

# The GPU check's whole pipeline on a CPU at toy size (SPO_GPU_CHECK_CPU=1 bash bench/gpu_check.sh): every
# run, check and report path, in about a minute. Its figures describe nothing but the toy.
GPU_CPU = BenchConfig(
    workload=Workload(
        shape=TOY_SHAPE,
        lengths=LengthModel(prompt_median=12, response_median=24, max_length=128),
        n_pairs=12,
        pairs_per_device=2,
        grad_accum=2,
        learning_rate=1e-4,
        loss="spo",
        threads=1,
    ),
    rounds=1,
    name="gpu-cpu",
    keep_going=True,
    gpu=GpuCheck(
        attentions=("sdpa", "flash_attention_2"),
        peak_size=512,
        peak_dtype="float32",
        peak_repeats=5,
        check_pairs=4,
        lora_r=4,
        lora_alpha=8.0,
        gen_prompts=4,
        gen_batch=2,
        gen_new_tokens=8,
        gen_rounds=2,
        caps=(
            ("peak", 60.0),
            ("trl", 90.0),
            ("spo", 90.0),
            ("spo-compiled", 120.0),
            ("check", 60.0),
            ("check-compiled", 120.0),
            ("generate", 60.0),
        ),
    ),
)

# The main case (issue 17, item 5): the real SmolLM2-135M-Instruct (30 layers, hidden 576, vocab 49,152) as a
# user fine-tunes it on a CPU: LoRA r 16 on all linear layers, DPO sigmoid beta 0.1, 16 UltraFeedback-layout
# pairs with answers of about 300 tokens, 4 pairs per step, no gradient checkpointing on either side, 2
# threads; TRL, spo padded and spo packed alternate in every round.
REAL = BenchConfig(
    workload=Workload(
        model="smollm2-135m-instruct",
        lengths=LengthModel(
            prompt_median=60.0, prompt_sigma=0.5, response_median=300.0, response_sigma=0.2, max_length=1024
        ),
        n_pairs=16,
        pairs_per_device=4,
        learning_rate=2e-4,
        lora_r=16,
        lora_alpha=32.0,
    ),
    runs=("trl", "spo-padded", "spo-packed"),
    parts=("preference",),
    name="real",
    job_timeout_s=3600.0,
)


SIZES = {"real": REAL, "full": FULL, "toy": TOY, "gpu": GPU, "gpu-cpu": GPU_CPU}


def with_dirs(config: BenchConfig, work_dir: Path | None, results_dir: Path | None, rounds: int | None) -> BenchConfig:
    changes: dict[str, Any] = {}
    if work_dir is not None:
        changes["work_dir"] = Path(work_dir)
    if results_dir is not None:
        changes["results_dir"] = Path(results_dir)
    if rounds is not None:
        changes["rounds"] = rounds
    return replace(config, **changes)
