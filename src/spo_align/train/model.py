"""Model set-up: where the weights come from, attention kernel, dtype, LoRA/QLoRA.

Every check that can fail on the user's machine (flash-attn missing, QLoRA without CUDA) runs before any
weights are read, so a bad recipe fails in a second instead of after a multi-gigabyte download.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from spo_align.recipe.resolve import RunPlan

logger = logging.getLogger(__name__)

TINY_PREFIX = "tiny:"


class ModelSetupError(ValueError):
    """The model section asks for something this machine cannot do (named in the message)."""


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def cache_dir() -> Path:
    """Where materialised tiny models live: $SPO_ALIGN_CACHE, else ~/.cache/spo_align."""
    env = os.environ.get("SPO_ALIGN_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "spo_align"


def resolve_model_path(name_or_path: str) -> str:
    """`tiny:<name>` -> the embedded tiny model written under the cache; an existing local path -> absolute.

    Anything else is returned unchanged (a hub id, read by `from_pretrained` as usual).
    """
    if name_or_path.startswith(TINY_PREFIX):
        from spo_align.tiny import write_tiny_model

        name = name_or_path[len(TINY_PREFIX) :].strip()
        if not name or "/" in name or name.startswith("."):
            raise ModelSetupError(f"bad tiny model name {name_or_path!r}: use tiny:<name>, e.g. tiny:arith")
        return str(write_tiny_model(cache_dir() / "tiny" / name))
    local = Path(name_or_path).expanduser()
    if local.exists():
        return str(local.resolve())
    return name_or_path


def resolve_dtype(plan: RunPlan) -> torch.dtype:
    """`auto`: bfloat16 on CUDA, float32 on CPU; otherwise the dtype the recipe names."""
    import torch

    name = plan.recipe.model.dtype
    if name == "auto":
        return torch.bfloat16 if cuda_available() else torch.float32
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def fp32_master_weights(plan: RunPlan) -> bool:
    """Whether the trained weights are kept in float32 under bfloat16 autocast.

    So for full fine-tuning in bfloat16 without DeepSpeed: the optimizer would otherwise update bfloat16
    weights directly, rounding away every update below half a bfloat16 step (2**-9 to 2**-8 of the weight);
    AdamW's updates are about the learning rate, so at 5e-7 no weight above ~2.6e-4 in magnitude would move.
    With an adapter only the adapter trains (peft keeps it in float32 over the bfloat16 base); DeepSpeed
    keeps float32 masters itself.
    """
    import torch

    return plan.recipe.adapter is None and plan.deepspeed_config is None and resolve_dtype(plan) == torch.bfloat16


def weights_dtype(plan: RunPlan) -> torch.dtype:
    """The dtype models are loaded in: float32 under `fp32_master_weights`, else the recipe's dtype. A frozen
    reference copy is loaded like the policy, so that both compute the same function at the first step."""
    import torch

    return torch.float32 if fp32_master_weights(plan) else resolve_dtype(plan)


def _flash_attn_problem(dtype: torch.dtype) -> str | None:
    """Why flash_attention_2 cannot run here, or None when it can."""
    import torch

    if not cuda_available():
        return "it needs a CUDA GPU and none is available"
    if importlib.util.find_spec("flash_attn") is None:
        return "the flash-attn package is not installed (pip install 'spo-align[flash]')"
    if dtype not in (torch.bfloat16, torch.float16):
        return f"it needs bfloat16 or float16 weights, and the recipe resolves to {dtype}"
    return None


def resolve_attention(plan: RunPlan) -> str:
    """The attention implementation to load with; raises `ModelSetupError` if the requested one cannot run."""
    requested = plan.recipe.model.attention
    dtype = resolve_dtype(plan)
    if requested == "auto":
        return "flash_attention_2" if _flash_attn_problem(dtype) is None else "sdpa"
    if requested == "flash_attention_2":
        problem = _flash_attn_problem(dtype)
        if problem is not None:
            raise ModelSetupError(
                f"model.attention: flash_attention_2 cannot run here: {problem}. "
                "Use attention: auto or sdpa."
            )
    return requested


def _check_adapter_possible(plan: RunPlan) -> None:
    adapter = plan.recipe.adapter
    if adapter is None or adapter.type != "qlora":
        return
    if not cuda_available():
        raise ModelSetupError("adapter.type: qlora needs a CUDA GPU (4-bit bitsandbytes kernels); use lora on CPU")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelSetupError(
            "adapter.type: qlora needs the bitsandbytes package (pip install 'spo-align[qlora]')"
        )


def _check_starting_folders(plan: RunPlan) -> None:
    """A local model, tokenizer or reference folder that is an unfinished spo-align run (an SFT stage stopped
    before its end) is refused: its model is missing or half-written."""
    from spo_align.run_folder import unfinished_run_problem

    section = plan.recipe.model
    for key, path in (
        ("model.name_or_path", plan.model_path), ("model.tokenizer", section.tokenizer),
        ("reference.model", plan.reference_model_path),
    ):
        if path is None or path.startswith(TINY_PREFIX):
            continue
        problem = unfinished_run_problem(Path(path).expanduser())
        if problem is not None:
            raise ModelSetupError(f"{key}: {problem}")


def check_model_setup(plan: RunPlan) -> None:
    """Every model-section check that does not need the weights (attention, dtype, QLoRA, unfinished runs): once per process that
    starts a run, before its output folder is claimed (`run.run`, `launch.launch`). `load_model` then resolves
    the attention and checks QLoRA where it uses them, so a direct caller is refused before loading too."""
    resolve_attention(plan)
    _check_adapter_possible(plan)
    _check_starting_folders(plan)


def load_tokenizer(plan: RunPlan) -> PreTrainedTokenizerBase:
    """The recipe's tokenizer (default: the model's), with a pad token and the recipe's chat template, if any."""
    from transformers import AutoTokenizer

    model_section = plan.recipe.model
    source = resolve_model_path(model_section.tokenizer or model_section.name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(
        source, revision=revision_of(plan, model_section.tokenizer), trust_remote_code=model_section.trust_remote_code
    )
    if model_section.chat_template is not None:
        tokenizer.chat_template = model_section.chat_template
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _quantization_config(plan: RunPlan) -> Any:
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=resolve_dtype(plan),
    )


def revision_of(plan: RunPlan, name_or_path: str | None) -> str | None:
    """The revision to load `name_or_path` at: model.revision for the starting model (None, or its own path,
    as a reference that names the model is the starting model), the default branch for any other model."""
    if name_or_path is None or name_or_path in (plan.model_path, plan.recipe.model.name_or_path):
        return plan.recipe.model.revision
    return None


def load_model(
    plan: RunPlan, name_or_path: str | None = None, *, for_training: bool = True
) -> PreTrainedModel:
    """Load the policy (or, with `name_or_path`, another model such as a reference) with the recipe's settings,
    at the revision `revision_of` gives.

    A folder holding only a LoRA adapter (an earlier LoRA stage's output) is loaded onto its base and merged,
    so a later stage starts from the adapted weights. `for_training=False` puts the model in eval mode with
    gradients off (reference models).
    """
    from transformers import AutoModelForCausalLM

    model_section = plan.recipe.model
    path = resolve_model_path(name_or_path or model_section.name_or_path)
    kwargs: dict[str, Any] = {
        "revision": revision_of(plan, name_or_path),
        "trust_remote_code": model_section.trust_remote_code,
        "attn_implementation": resolve_attention(plan),
        "dtype": weights_dtype(plan),
    }
    if for_training and plan.recipe.adapter is not None and plan.recipe.adapter.type == "qlora":
        _check_adapter_possible(plan)
        kwargs["quantization_config"] = _quantization_config(plan)

    adapter_only = Path(path, "adapter_config.json").exists() and not Path(path, "config.json").exists()
    if adapter_only:
        from peft import AutoPeftModelForCausalLM

        logger.info("%s holds a LoRA adapter: loading it onto its base and merging", path)
        kwargs.pop("quantization_config", None)
        model = AutoPeftModelForCausalLM.from_pretrained(path, **kwargs).merge_and_unload()
    else:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if not for_training:
        model.eval()
        model.requires_grad_(False)
    elif fp32_master_weights(plan):
        logger.info("full fine-tuning in bfloat16 without DeepSpeed: float32 weights, bfloat16 autocast")
    logger.info(
        "loaded %s (%s, attention %s, %.2fM parameters)",
        path,
        kwargs["dtype"],
        kwargs["attn_implementation"],
        sum(p.numel() for p in model.parameters()) / 1e6,
    )
    return model


def lora_config(plan: RunPlan) -> Any:
    """The peft `LoraConfig` of the recipe's adapter section."""
    from peft import LoraConfig

    adapter = plan.recipe.adapter
    if adapter is None:
        raise ModelSetupError("the recipe has no adapter section")
    target = adapter.target_modules if isinstance(adapter.target_modules, str) else list(adapter.target_modules)
    return LoraConfig(
        r=adapter.r,
        lora_alpha=adapter.alpha,
        lora_dropout=adapter.dropout,
        target_modules=target,
        task_type="CAUSAL_LM",
    )


@contextlib.contextmanager
def quiet_checkpointing_aliases() -> Iterator[None]:
    """Hide transformers' FutureWarnings for the old names of its checkpointing API that peft and TRL still use.

    peft's `PeftModel` reads ``is_gradient_checkpointing`` when it wraps a model, and TRL's KTO trainer reads
    it (and calls ``gradient_checkpointing_disable``/``_enable``) around every reference pass: nothing a
    recipe can change. Only those messages, raised from transformers' modeling code, are hidden; every other
    warning still shows.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore",
            message=r"`(is_)?gradient_checkpointing(_enable|_disable)?` is deprecated",
            category=FutureWarning,
            module=r"transformers\.modeling_utils",
        )
        yield


def apply_adapter(model: PreTrainedModel, plan: RunPlan) -> Any:
    """Wrap the model with the recipe's LoRA adapter (QLoRA: prepared for k-bit training); unchanged without one."""
    adapter = plan.recipe.adapter
    if adapter is None:
        return model
    from peft import get_peft_model, prepare_model_for_kbit_training

    with quiet_checkpointing_aliases():
        if adapter.type == "qlora":
            model = prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=plan.recipe.training.gradient_checkpointing
            )
        peft_model = get_peft_model(model, lora_config(plan))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in peft_model.parameters())
    logger.info("%s adapter: %d of %d parameters trainable", adapter.type, trainable, total)
    return peft_model


def dropout_disabled(plan: RunPlan) -> bool:
    """training.disable_dropout, or its stage default: on for preference stages, off for SFT."""
    value = plan.recipe.training.disable_dropout
    return plan.recipe.stage == "preference" if value is None else value


def disable_dropout(model: Any) -> int:
    """Set every dropout of `model` to 0: dropout layers (LoRA's included) and the float dropout rates modules
    copy from their config (e.g. Llama's ``attention_dropout``, used as a functional dropout). The config
    itself is left as it is, so a saved model keeps its rates. Returns how many rates were above 0."""
    from torch import nn

    layers = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)
    changed = 0
    for module in model.modules():
        if isinstance(module, layers) and module.p > 0:
            module.p = 0.0
            changed += 1
        rates = [
            name for name, value in vars(module).items()
            if "dropout" in name and isinstance(value, float) and value > 0
        ]
        for name in rates:
            setattr(module, name, 0.0)
            changed += 1
    return changed


def apply_dropout_setting(model: Any, plan: RunPlan) -> bool:
    """Disable the model's dropout when `dropout_disabled(plan)`; returns whether it did."""
    if not dropout_disabled(plan):
        return False
    changed = disable_dropout(model)
    logger.info("dropout off for training: %d rate(s) set to 0 (training.disable_dropout)", changed)
    return True
