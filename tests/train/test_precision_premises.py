"""What the recipe's float16 check (recipe/checks.py `precision`) rests on, with the installed torch and peft:
the fp16 gradient scaler refuses float16 weights, and a LoRA adapter on a float16 base trains float32 weights.
If either library changes, this fails and the check must be revisited."""

from __future__ import annotations

from pathlib import Path

import pytest


def _scaled_step(model) -> None:
    """One backward through torch's fp16 gradient scaler, then the unscale that gradient clipping does."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params)
    scaler = torch.amp.GradScaler("cpu")
    ids = torch.tensor([[1, 2, 3, 4]])
    loss = model(input_ids=ids, labels=ids).loss.float()
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)


def test_float16_full_fine_tuning_fails_and_float16_lora_trains(small_model: Path, plan_from) -> None:
    import torch

    from spo_align.train.model import apply_adapter, load_model

    # The recipe loader refuses float16 full fine-tuning, so the float16 weights are made by hand here.
    full = plan_from("spo", f"model.name_or_path={small_model}", "model.dtype=float32")
    model = load_model(full).to(torch.float16)
    with pytest.raises(ValueError, match="Attempting to unscale FP16 gradients"):
        _scaled_step(model)

    lora = plan_from("spo", f"model.name_or_path={small_model}", "model.dtype=float16", "adapter={type: lora, r: 2}")
    model = apply_adapter(load_model(lora), lora)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    assert any(p.dtype == torch.float16 for p in model.parameters() if not p.requires_grad)
    _scaled_step(model)
