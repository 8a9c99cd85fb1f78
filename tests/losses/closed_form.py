"""Float64 closed forms and autograd helpers the loss tests compare against."""

from __future__ import annotations

import math

import torch


def f(z: float) -> float:
    """SPO's f(z) = -z exp(-z)."""
    return -z * math.exp(-z)


def f_prime(z: float) -> float:
    return (z - 1.0) * math.exp(-z)


def log_sigmoid(u: float) -> float:
    return -math.log1p(math.exp(-u)) if u >= 0 else u - math.log1p(math.exp(u))


def sigmoid(u: float) -> float:
    return math.exp(log_sigmoid(u))


def leaves(*values: float, dtype: torch.dtype = torch.float64) -> list[torch.Tensor]:
    """One single-element tensor per value, each requiring grad."""
    return [torch.tensor([v], dtype=dtype, requires_grad=True) for v in values]


def grads(loss: torch.Tensor, inputs: list[torch.Tensor]) -> list[float]:
    return [g.item() for g in torch.autograd.grad(loss.sum(), inputs)]


def brentq(fn, lo: float, hi: float) -> float:
    """The root of `fn` in [lo, hi] (signs differ at the ends), by bisection to float64 precision."""
    assert fn(lo) * fn(hi) < 0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if fn(lo) * fn(mid) > 0 else (lo, mid)
    return (lo + hi) / 2


def tiny_recipe_loss(loss_type: str):
    """The loss section of `recipes/tiny/<type>.yaml`, the tiny recipe every loss ships with."""
    from pathlib import Path

    from spo_align.recipe.load import load_recipe

    path = Path(__file__).resolve().parents[2] / "recipes" / "tiny" / f"{loss_type}.yaml"
    return load_recipe(path).loss
