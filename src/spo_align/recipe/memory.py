"""Per-GPU memory of a resolved recipe, estimated before any machine is rented (no torch imported).

The estimate follows what the runner does (docs/memory.md derives every term):

    peak allocated = resident + max(training step, optimizer step)
    total          = peak allocated + allocator allowance + CUDA context          (device "cuda" only)

- resident: weights, gradients, master weights and optimizer states as the ZeRO stage, offload flags and
  process count place them (with DeepSpeed, exactly DeepSpeed's own `estimate_zero{2,3}_model_states_mem_needs`
  split into its parts), DeepSpeed's communication buckets, DDP's gradient buckets, the reference model.
- training step: the activations autograd saves at the micro-batch's worst-case token count, plus the larger
  of the LM head's backward (its chunked logits and weight-gradient buffers) and one decoder layer's backward.
- optimizer step: the scratch the optimizer allocates while it updates (foreach AdamW: one fp32 copy of its
  states' size).

`device="cpu"` estimates the same run as it executes on CPU (float32 for `dtype: auto`, per-tensor AdamW, no
CUDA overheads); the tests compare that with peaks measured on CPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from spo_align.losses.registry import loss_entry
from spo_align.recipe.model_shapes import ModelShape
from spo_align.recipe.resolve import default_pack_length

if TYPE_CHECKING:
    from spo_align.recipe.resolve import RunPlan

Device = Literal["cuda", "cpu"]
Phase = Literal["resident", "step", "optimizer", "overhead"]
GIB = 1024**3

PAIR_HEAD_CHUNK = 512
"""Tokens per chunk of this project's LM head (`spo_align.train.sequence_logps.DEFAULT_CHUNK_SIZE`; a test keeps them equal)."""
TRL_HEAD_TOKENS, TRL_HEAD_VOCAB = 4096, 32768
"""Tile of TRL's fused LM head (SFT, KTO): `trl.kernels.chunked_logprob.TOKEN_CHUNK_SIZE` tokens by
`trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE` vocabulary entries (a test keeps them equal)."""
CUDA_CONTEXT_GIB = 1.5
"""CUDA context, kernels and library workspaces (cuBLAS, NCCL) per process: typically 1-2 GiB."""
ALLOCATOR_ALLOWANCE = 0.10
"""PyTorch's caching allocator reserves more than it hands out (fragmentation, cached blocks): 10% of the peak."""
QLORA_BYTES = 0.5 + 1 / 64
"""NF4 weight (4 bits) plus its double-quantized 8-bit scale per 64-value block."""
DEEPSPEED_BUCKET_DEFAULTS = {"reduce_bucket_size": 5e8, "allgather_bucket_size": 5e8, "stage3_prefetch_bucket_size": 5e7}


@dataclass(frozen=True)
class Term:
    key: str
    label: str
    nbytes: int
    phase: Phase
    note: str = ""


@dataclass(frozen=True)
class Setting:
    """The facts of a plan that decide its memory, derived once from the recipe."""

    device: Device
    stage: Literal["pair", "kto", "sft"]
    compute_bytes: int
    """Bytes per value of matmul inputs/outputs (2 under bfloat16/float16 compute, else 4)."""
    stream_bytes: int
    """Bytes per value of the residual stream and norms (4 over float32 master weights or a QLoRA base)."""
    fp32_masters: bool
    world: int
    zero_stage: int | None
    offload_optimizer: bool
    offload_params: bool
    trainable: int
    total: int
    reference: Literal["none", "adapter", "precomputed", "model"]
    sequences: int
    """Rows of one forward (padded sequences, or packed rows)."""
    length: int
    """Tokens per row."""
    attention: Literal["sdpa", "flash", "eager"]
    lora_rank: int
    """The adapter's rank (0: full fine-tuning)."""
    lora_projections: int
    """Projections per layer that carry an adapter."""

    @property
    def masked(self) -> bool:
        """Whether attention gets an explicit mask: sdpa and eager over padded or packed rows, which the
        worst case assumes (a padded batch without padding, or a single sequence, gets none)."""
        return self.attention != "flash"


def _dtype_bytes(name: str, device: Device) -> int:
    if name == "auto":
        return 2 if device == "cuda" else 4
    return 4 if name == "float32" else 2


def _offloaded(config: dict[str, object] | None, key: str) -> bool:
    zero = (config or {}).get("zero_optimization")
    section = zero.get(key) if isinstance(zero, dict) else None
    return isinstance(section, dict) and section.get("device") in ("cpu", "nvme")


def setting(plan: RunPlan, shape: ModelShape, device: Device) -> Setting:
    recipe = plan.recipe
    adapter = recipe.adapter
    compute = _dtype_bytes(recipe.model.dtype, device)
    masters = adapter is None and plan.deepspeed_config is None and compute == 2 and recipe.model.dtype != "float16"
    qlora = adapter is not None and adapter.type == "qlora"
    stage: Literal["pair", "kto", "sft"] = "sft" if recipe.loss is None else loss_entry(recipe.loss).stage  # type: ignore[assignment]
    reference: Literal["none", "adapter", "precomputed", "model"] = "none"
    if recipe.loss is not None and loss_entry(recipe.loss).needs_reference:
        if adapter is not None and not plan.separate_reference:
            reference = "adapter"
        elif recipe.reference.precompute and stage == "pair":  # the pair trainer releases the model once computed
            reference = "precomputed"
        else:
            reference = "model"
    data, batch = recipe.data, recipe.training.per_device_batch_size
    per_example = 1 if stage in ("sft", "kto") else 2
    sequences, length = batch * per_example, data.max_length
    if data.packing and stage != "kto":
        pack = plan.pack_length or default_pack_length(data.max_length, device)
        if stage == "sft":  # TRL's padding-free collator: the micro-batch's rows as one flat row
            sequences, length = 1, batch * pack
        else:  # rows of pack_length holding at worst the same tokens as the padded batch
            sequences, length = max(1, math.ceil(sequences * data.max_length / pack)), pack
    attention = {"flash_attention_2": "flash", "flex_attention": "flash", "eager": "eager"}.get(recipe.model.attention, "sdpa")
    return Setting(
        device=device,
        stage=stage,
        compute_bytes=compute,
        stream_bytes=4 if masters or qlora else compute,
        fp32_masters=masters,
        world=plan.world_size,
        zero_stage=plan.zero_stage,
        offload_optimizer=_offloaded(plan.deepspeed_config, "offload_optimizer"),
        offload_params=_offloaded(plan.deepspeed_config, "offload_param"),
        trainable=shape.total_params if adapter is None else shape.lora_params(adapter.r, adapter.target_modules),
        total=shape.total_params,
        reference=reference,
        sequences=sequences,
        length=length,
        attention=attention,  # type: ignore[arg-type]
        lora_rank=adapter.r if adapter is not None else 0,
        lora_projections=len(shape.adapted(adapter.target_modules)) if adapter is not None else 0,
    )


def optimizer_state_bytes(optimizer: str) -> int:
    """Bytes of optimizer state per trainable parameter: two fp32 moments (AdamW), two 8-bit ones, none (SGD,
    which the Trainer builds without momentum)."""
    return {"adamw_torch": 8, "adamw_torch_fused": 8, "adamw_8bit": 2, "sgd": 0}[optimizer]


# ---------------------------------------------------------------- resident: weights, gradients, optimizer


def model_state_terms(plan: RunPlan, shape: ModelShape, s: Setting) -> list[Term]:
    optim = optimizer_state_bytes(plan.recipe.training.optimizer)
    if s.zero_stage is not None:
        return _deepspeed_terms(plan, shape, s, optim)
    adapter = plan.recipe.adapter
    terms: list[Term] = []
    if adapter is None:
        width = 4 if s.fp32_masters else s.compute_bytes
        note = "float32 master weights (bfloat16 autocast)" if s.fp32_masters else f"{8 * width}-bit weights"
        terms.append(Term("weights", "weights", s.total * width, "resident", note))
    elif adapter.type == "qlora":
        quantized = shape.num_layers * sum(i * o for i, o in shape.linears().values())
        terms.append(Term("weights", "weights (QLoRA base)", int(quantized * QLORA_BYTES) + (s.total - quantized) * 4,
                          "resident", "4-bit projections; embeddings, head and norms upcast to float32 by peft"))
        terms.append(Term("adapter", "LoRA adapter (float32)", s.trainable * 4, "resident"))
    else:
        terms.append(Term("weights", "weights (frozen base)", s.total * s.compute_bytes, "resident"))
        terms.append(Term("adapter", "LoRA adapter (float32)", s.trainable * 4, "resident"))
    terms.append(Term("gradients", "gradients (float32)", s.trainable * 4, "resident"))
    terms.append(Term("optimizer", f"optimizer states ({plan.recipe.training.optimizer})", s.trainable * optim, "resident"))
    if s.world > 1:
        terms.append(Term("ddp_buckets", "DDP gradient buckets", s.trainable * 4, "resident",
                          "a second copy of the gradients (gradient_as_bucket_view is off)"))
    return terms


def _deepspeed_terms(plan: RunPlan, shape: ModelShape, s: Setting, optim: int) -> list[Term]:
    """DeepSpeed's own accounting (stage_1_and_2 / stage3 `estimate_*_model_states_mem_needs`), in its parts.
    ZeRO-2: 16-bit weights (2 bytes per parameter, whole) plus 18 bytes per trainable parameter partitioned over
    every rank: 2 + 4 of gradients (16-bit and fp32), 4 of fp32 master weights, 8 of Adam moments. ZeRO-3: the
    same 18 bytes partitioned, 2 of them its 16-bit weights (4 left for gradients), plus a gathered layer of 4
    bytes per parameter of the largest module. Stages 0 and 1 are counted like 2. The optimizer's 8 bytes follow
    training.optimizer (2 for adamw_8bit, 0 for sgd)."""
    n = s.world if s.zero_stage and s.zero_stage > 0 else 1
    sharded = "" if n == 1 else f"1/{n} per GPU"
    terms: list[Term] = []
    width = s.compute_bytes  # 4 when the recipe trains in float32 (the config's bf16/fp16 "auto" then off)
    weights = 0 if s.offload_params else (s.total * width // n if s.zero_stage == 3 else s.total * width)
    terms.append(Term("weights", f"weights ({8 * width}-bit)", weights, "resident",
                      "offloaded to CPU" if s.offload_params else (sharded if s.zero_stage == 3 else "")))
    if s.offload_optimizer:
        for key, label in (("gradients", "gradients"), ("master_weights", "master weights"), ("optimizer", "optimizer states")):
            terms.append(Term(key, label, 0, "resident", "offloaded to CPU"))
    else:
        # DeepSpeed's 18 bytes per trainable parameter: ZeRO-3 counts its 16-bit weights among them (4 left for
        # gradients: 2 of them 16-bit), ZeRO-1/2 keep the 16-bit weights whole besides (2 + 4 for 16-bit and fp32
        # gradients). In float32 the "16-bit" parts are 4 bytes; DeepSpeed still clones an fp32 master partition.
        grads = width + (2 if s.zero_stage == 3 else 4)
        terms.append(Term("gradients", "gradients (16-bit + fp32)" if width == 2 else "gradients (fp32)", s.trainable * grads // n, "resident",
                          sharded))
        terms.append(Term("master_weights", "master weights (fp32)", s.trainable * 4 // n, "resident", sharded))
        terms.append(Term("optimizer", f"optimizer states ({plan.recipe.training.optimizer})", s.trainable * optim // n,
                          "resident", sharded))
    if s.zero_stage == 3:
        terms.append(Term("gathered_layer", "ZeRO-3 gathered layer", 4 * shape.largest_module_params, "resident",
                          "4 bytes x the largest module (DeepSpeed's term)"))
    zero = (plan.deepspeed_config or {}).get("zero_optimization")
    zero = zero if isinstance(zero, dict) else {}

    def size(key: str, auto: float) -> float:
        value = zero.get(key, DEEPSPEED_BUCKET_DEFAULTS[key])
        return auto if value == "auto" else float(value) if isinstance(value, (int, float)) else auto

    h2 = shape.hidden_size**2  # transformers fills "auto" buckets from the hidden size
    second = size("stage3_prefetch_bucket_size", 0.9 * h2) if s.zero_stage == 3 else size("allgather_bucket_size", 5e8)
    terms.append(Term("deepspeed_buckets", "DeepSpeed communication buckets",
                      int(width * (size("reduce_bucket_size", h2) + second)), "resident", "reduce + gather buckets"))
    return terms


def reference_terms(plan: RunPlan, s: Setting) -> list[Term]:
    notes = {"none": "none (reference-free loss)" if s.stage != "sft" else "none (SFT)",
             "adapter": "the policy with its adapter off: no copy", "precomputed": "precomputed log-probs: no model"}
    if s.reference != "model":
        return [Term("reference", "reference model", 0, "resident", notes[s.reference])]
    bits = f"reference model ({8 * s.compute_bytes}-bit)"
    if s.zero_stage == 3:
        return [Term("reference", bits, s.total * s.compute_bytes // s.world, "resident", f"ZeRO-3, 1/{s.world} per GPU")]
    if s.zero_stage is not None:
        return [Term("reference", bits, s.total * s.compute_bytes, "resident", "a full copy per GPU")]
    width = 4 if s.fp32_masters else s.compute_bytes
    return [Term("reference", f"reference model ({8 * width}-bit)", s.total * width, "resident",
                 "a frozen copy, loaded like the policy")]


# ---------------------------------------------------------------- training step: activations and transients


def layer_activation_bytes(shape: ModelShape, s: Setting) -> int:
    """Bytes autograd saves per token in one decoder layer (docs/memory.md). Two RMSNorms: their fp32 input,
    the normalised value and the scaled output a linear takes (plus its 16-bit cast under autocast over fp32
    weights). Attention: the rotated q and k and the v it reads (k and v repeated to every head when sdpa gets
    a mask), its output (the o_proj input shares it) and fp32 log-sum-exp; eager attention also keeps its fp32
    softmax and its cast. The gated MLP: gate, SiLU, up and their product. LoRA: each A projection's output."""
    h, c, r = shape.hidden_size, s.compute_bytes, s.stream_bytes
    norm = 4 * h + 2 * r * h + (c * h if r != c else 0)
    heads, kv = shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
    if s.attention == "flash":
        attention = (2 * heads + 2 * kv) * c
    elif s.attention == "eager":
        attention = 4 * heads * c + shape.num_heads * s.length * (4 + c)
    else:
        attention = (2 * heads + 2 * (heads if s.masked else kv)) * c
    attention += 4 * shape.num_heads
    lora = s.lora_projections * s.lora_rank * c  # lora_A's output, saved by lora_B (dropout off)
    return 2 * norm + attention + 4 * shape.intermediate_size * c + lora


def pair_head_bytes(
    vocab: int, hidden: int, tokens: int, chunk: int, compute: int, stream: int, device: Device, trains: bool
) -> tuple[int, int]:
    """(backward peak, weight operand) bytes of this project's LM head (`train/sequence_logps`) over `tokens`
    scored tokens in `chunk`-token chunks. The head reads hidden states and weight rounded to the compute dtype
    (`compute` bytes), accumulates and outputs fp32 (`HeadMatmul`); its weight has `stream` bytes per value
    (like the residual stream: fp32 over fp32 masters or a QLoRA base) and is rounded once per pass, a copy
    unless it already has the compute dtype. On CUDA a half-precision kernel writes fp32; on CPU the rounded
    operands are held in fp32. Backward: one chunk's fp32 logits, turned into their gradient in place, and that
    gradient rounded; the saved hidden rows; the weight operand; when the head trains, the fp32 weight-gradient
    accumulator, one chunk's fp32 product (only where the product cannot be added in place: CUDA, half
    precision) and the final cast to the weight's dtype."""
    cpu_half = device == "cpu" and compute != 4
    operand = vocab * hidden * (4 if cpu_half else (compute if compute != stream else 0))
    gradient_operand = 4 + compute if cpu_half else (compute if compute != 4 else 0)  # CPU: rounded, then upcast
    backward = chunk * vocab * (4 + gradient_operand) + tokens * hidden * stream + operand
    if trains:
        product = 4 if compute != 4 and not cpu_half else 0
        backward += vocab * hidden * (4 + product + (stream if stream != 4 else 0))
    return backward, operand


def step_terms(plan: RunPlan, shape: ModelShape, s: Setting) -> list[Term]:
    recipe = plan.recipe
    h, v, c, r = shape.hidden_size, shape.vocab_size, s.compute_bytes, s.stream_bytes
    tokens = s.sequences * s.length
    layer = layer_activation_bytes(shape, s)
    final = 4 * h + 2 * r * h + r * h  # final norm and the head's input rows
    checkpointing = recipe.training.gradient_checkpointing
    saved = tokens * (shape.num_layers * (r * h if checkpointing else layer) + final)
    where = f"{s.sequences} x {s.length} tokens, {'layer inputs only (checkpointing)' if checkpointing else 'every layer'}"
    terms = [Term("activations", "activations", saved, "step", where)]
    mask = s.sequences * s.length**2 if s.masked else 0
    if mask:
        per_layer = c * mask  # sdpa turns the boolean mask into an additive one, saved by every layer
        layers = 1 if checkpointing else shape.num_layers
        terms.append(Term("attention_mask", "attention masks", mask + layers * per_layer, "step",
                          "boolean mask and its additive copy per layer (none under flash attention)"))
    head_trains = recipe.adapter is None
    head_operand = 0
    if s.stage == "pair":
        chunk = min(PAIR_HEAD_CHUNK, tokens)
        head, head_operand = pair_head_bytes(v, h, tokens, chunk, c, r, s.device, head_trains)
        head_note = f"{chunk}-token chunks of fp32 logits" + (", fp32 weight-gradient buffers" if head_trains else "")
    else:
        # its tile buffer is TRL_HEAD_VOCAB wide whatever the vocabulary; without Triton (CPU) its torch fallback
        # also holds about eight fp32 temporaries of a tile's used width (y, z, log p, p, the gradient, ...)
        rows = min(tokens, TRL_HEAD_TOKENS)
        head = rows * TRL_HEAD_VOCAB * c + tokens * h * (4 + r)
        head += 8 * rows * min(v, TRL_HEAD_VOCAB) * 4 if s.device == "cpu" else 0
        head += v * h * (4 + (c if c != 4 else 0)) if head_trains else 0
        head_note = "TRL's fused head tiles" + (", fp32 weight gradient" if head_trains else "")
    largest_linear = max(i * o for i, o in shape.linears().values())
    # In flight at a layer's MLP backward: the gradients of gate-SiLU and up (its product's saved input freed),
    # of the layer output and the residual; and the largest projection's weight gradient.
    layer_backward = tokens * (2 * shape.intermediate_size * c + 2 * h * r) + (largest_linear * 4 if head_trains else 0)
    if checkpointing:
        layer_backward += tokens * layer
    # A forward's unsaved intermediates (the reference's no-grad pass runs while the policy's activations are
    # held): SiLU, up and their product in the MLP, the residual and its norm; or a chunk of head logits.
    head_forward = min(PAIR_HEAD_CHUNK, tokens) * v * 8 + head_operand if s.stage == "pair" else 0
    forward = max(tokens * (3 * shape.intermediate_size * c + 2 * h * r), head_forward)
    transients = [
        (head, "LM head backward", head_note),
        (layer_backward, "decoder layer backward",
         "one layer recomputed, with its gradients" if checkpointing else "one layer's gradients in flight"),
        (forward, "forward intermediates", "a layer's unsaved MLP values (the reference pass, the policy's)"),
    ]
    nbytes, label, note = max(transients, key=lambda item: item[0])
    terms.append(Term("transient_peak", label, nbytes, "step", f"the largest of three transients: {note}"))
    if s.fp32_masters:
        terms.append(Term("autocast_copies", "autocast bfloat16 weight copies", shape.linear_params * 2, "step",
                          "held by the graph from forward to backward"))
    return terms


def optimizer_terms(plan: RunPlan, shape: ModelShape, s: Setting) -> list[Term]:
    optimizer = plan.recipe.training.optimizer
    if optimizer != "adamw_torch" or s.offload_optimizer:
        return [Term("optimizer_step", "optimizer step scratch", 0, "optimizer", f"{optimizer}: in place")]
    if s.device == "cpu":  # per-tensor AdamW: sqrt and quotient of the largest parameter
        return [Term("optimizer_step", "optimizer step scratch", 8 * min(shape.largest_module_params, s.trainable),
                     "optimizer", "per-tensor AdamW on CPU")]
    local = s.trainable // (s.world if s.zero_stage else 1)
    return [Term("optimizer_step", "optimizer step scratch", 4 * local, "optimizer", "foreach AdamW: sqrt of its states")]


# ---------------------------------------------------------------- the estimate


@dataclass(frozen=True)
class MemoryEstimate:
    shape: ModelShape
    setting: Setting
    terms: tuple[Term, ...]

    def phase(self, phase: Phase) -> int:
        return sum(term.nbytes for term in self.terms if term.phase == phase)

    @property
    def peak_allocated(self) -> int:
        return self.phase("resident") + max(self.phase("step"), self.phase("optimizer"))

    @property
    def total(self) -> int:
        return self.peak_allocated + self.phase("overhead")

    def term(self, key: str) -> Term | None:
        return next((term for term in self.terms if term.key == key), None)


def estimate_memory(plan: RunPlan, shape: ModelShape, device: Device = "cuda") -> MemoryEstimate:
    """The per-GPU (per-process) estimate of `plan` for a model of `shape`."""
    s = setting(plan, shape, device)
    terms = [*model_state_terms(plan, shape, s), *reference_terms(plan, s), *step_terms(plan, shape, s),
             *optimizer_terms(plan, shape, s)]
    if device == "cuda":
        allocated = sum(t.nbytes for t in terms if t.phase == "resident") + max(
            sum(t.nbytes for t in terms if t.phase == p) for p in ("step", "optimizer"))
        terms.append(Term("allocator", "allocator allowance", int(ALLOCATOR_ALLOWANCE * allocated), "overhead",
                          f"{ALLOCATOR_ALLOWANCE:.0%} of the allocated peak"))
        terms.append(Term("cuda_context", "CUDA context", int(CUDA_CONTEXT_GIB * GIB), "overhead", "kernels, cuBLAS, NCCL"))
    return MemoryEstimate(shape, s, tuple(terms))
