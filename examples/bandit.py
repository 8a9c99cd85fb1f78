"""The three-action bandit of Azar et al. (the IPO paper): where does each preference loss settle?

pi = softmax(theta) over actions {a, b, c}, pi_ref uniform, pi initialised to pi_ref. The preference data
are the three pairs (a > b), (b > c), (a > c), drawn uniformly in mini-batches, and each loss is trained
with Adam (lr 0.01). Theory says DPO pushes pi(a) towards 1 whatever beta (its loss has no finite
minimum), while IPO and SPO settle at finite margins. The three pairs cannot all sit at their own
per-pair optimum (margin_ac = margin_ab + margin_bc), so they settle at the minimiser of the expected
loss over the data, which :func:`expected_loss_minimiser` finds independently by full-batch L-BFGS.

The losses are built from recipe loss sections through the loss catalogue, exactly as training builds
them (every action is one token, so SimPO's per-token means are the log-probs themselves). Beside DPO,
cDPO, IPO and SPO it runs the three answers to falling chosen likelihoods: DPOP, SimPO, and DPO and SPO
with an NLL term on the chosen answer (docs/losses.md derives where each settles, or why it does not).

Run ``python examples/bandit.py`` (4000 Adam steps for nine losses: about 15 s of one CPU core).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from spo_align.losses.dpo import DPOLoss
from spo_align.losses.dpop import DPOPLoss
from spo_align.losses.ipo import IPOLoss, tau_matching_spo
from spo_align.losses.pair import PairInputs
from spo_align.losses.registry import build_pair_loss
from spo_align.losses.simpo import SimPOLoss
from spo_align.losses.spo import SPOLoss

ACTIONS = ("a", "b", "c")
PAIRS = torch.tensor([[0, 1], [1, 2], [0, 2]])  # (winner, loser): a > b, b > c, a > c
PAIR_NAMES = ("ab", "bc", "ac")
LOG_PI_REF = -math.log(len(ACTIONS))

PairLossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class BanditLoss:
    """A named loss: (policy chosen, policy rejected, ref chosen, ref rejected) log-probs -> [B] losses."""

    name: str
    fn: PairLossFn
    finite_optimum: bool


def from_recipe(name: str, section: Any, finite_optimum: bool) -> BanditLoss:
    """A recipe loss section as a bandit loss, built by the catalogue as training builds it (1 token per action)."""
    pair_loss = build_pair_loss(section)

    def fn(pc: torch.Tensor, pr: torch.Tensor, rc: torch.Tensor, rr: torch.Tensor) -> torch.Tensor:
        one = torch.ones_like(pc)
        return pair_loss(PairInputs(pc, pr, one, one, rc, rr)).losses

    return BanditLoss(name, fn, finite_optimum)


def default_losses(
    beta: float = 0.5, alpha: float = 1.0, small_beta: float = 0.1, lam: float = 50.0, gamma: float = 1.0,
    nll_weight: float = 1.0, spo_nll_weight: float = 0.1,
) -> list[BanditLoss]:
    """DPO at two betas, cDPO (eps 0.1), IPO matched to SPO's margin optimum, SPO; then DPOP, SimPO, DPO
    with an NLL term, and SPO with an NLL term (weights: `nll_weight`, `spo_nll_weight`)."""
    tau = tau_matching_spo(beta)
    return [
        from_recipe(f"DPO beta={small_beta}", DPOLoss(type="dpo", beta=small_beta, label_smoothing=0.0), False),
        from_recipe(f"DPO beta={beta}", DPOLoss(type="dpo", beta=beta, label_smoothing=0.0), False),
        from_recipe(f"cDPO beta={beta} eps=0.1", DPOLoss(type="dpo", beta=beta, label_smoothing=0.1), True),
        from_recipe(f"IPO tau={tau}", IPOLoss(type="ipo", tau=tau), True),
        from_recipe(f"SPO beta={beta} alpha={alpha}", SPOLoss(type="spo", beta=beta, alpha=alpha), True),
        from_recipe(f"DPOP beta={beta} lambda={lam:g}", DPOPLoss.model_validate({"type": "dpop", "beta": beta, "lambda": lam}), False),
        from_recipe(f"SimPO beta={beta} gamma={gamma:g}", SimPOLoss(type="simpo", beta=beta, gamma=gamma), False),
        from_recipe(
            f"DPO+NLL beta={beta} w={nll_weight:g}",
            DPOLoss(type="dpo", beta=beta, label_smoothing=0.0, nll_weight=nll_weight),
            False,
        ),
        from_recipe(
            f"SPO+NLL beta={beta} w={spo_nll_weight:g}",
            SPOLoss(type="spo", beta=beta, alpha=alpha, nll_weight=spo_nll_weight),
            True,
        ),
    ]


def margins(theta: torch.Tensor) -> torch.Tensor:
    """Log-ratio margins (ab, bc, ac) = theta differences; [..., 3]. The reference cancels."""
    return theta[..., PAIRS[:, 0]] - theta[..., PAIRS[:, 1]]


def log_ratios(pi: torch.Tensor) -> torch.Tensor:
    """log pi/pi_ref of each action (a, b, c); [..., 3]. b is chosen once (b > c) and rejected once (a > b)."""
    return torch.log(pi) - LOG_PI_REF


def pair_losses(losses: list[BanditLoss], theta: torch.Tensor) -> torch.Tensor:
    """Loss of each pair (ab, bc, ac) under pi = softmax(theta[i]) for each loss i: [L, 3]."""
    log_pi = torch.log_softmax(theta, dim=-1)
    chosen, rejected = log_pi[:, PAIRS[:, 0]], log_pi[:, PAIRS[:, 1]]
    ref = torch.full((len(PAIRS),), LOG_PI_REF, dtype=theta.dtype)
    return torch.stack([loss.fn(chosen[i], rejected[i], ref, ref) for i, loss in enumerate(losses)])


@dataclass(frozen=True)
class Snapshot:
    step: int
    pi: torch.Tensor  # [L, 3]
    margins: torch.Tensor  # [L, 3]


def train(
    losses: list[BanditLoss],
    *,
    steps: int,
    snapshot_steps: tuple[int, ...],
    batch_size: int = 512,
    lr: float = 0.01,
    seed: int = 0,
) -> list[Snapshot]:
    """Adam on each loss from pi = pi_ref, all losses seeing the same mini-batches.

    The logits of all losses live in one [L, 3] tensor: Adam is element-wise, so this is the same as one
    optimiser per loss, only faster.
    """
    generator = torch.Generator().manual_seed(seed)
    theta = torch.zeros(len(losses), len(ACTIONS), dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.Adam([theta], lr=lr)
    snapshots = []
    for step in range(1, steps + 1):
        # A mini-batch of pairs drawn uniformly; its mean loss is the per-pair loss weighted by pair counts.
        drawn = torch.randint(len(PAIRS), (batch_size,), generator=generator)
        weights = torch.bincount(drawn, minlength=len(PAIRS)).to(theta.dtype) / batch_size
        total = (pair_losses(losses, theta) * weights).sum()
        optimiser.zero_grad(set_to_none=True)
        total.backward()
        optimiser.step()
        if step in snapshot_steps:
            with torch.no_grad():
                snapshots.append(Snapshot(step, torch.softmax(theta, -1).clone(), margins(theta).clone()))
    return snapshots


def expected_loss_minimiser(loss: BanditLoss, *, max_iter: int = 500) -> torch.Tensor:
    """theta minimising the loss averaged over the three pairs, by full-batch L-BFGS (theta_c fixed at 0).

    Raises if the gradient at the result is not ~0, i.e. if no finite minimiser was found.
    """
    free = torch.zeros(2, dtype=torch.float64, requires_grad=True)

    def objective() -> torch.Tensor:
        theta = torch.cat([free, free.new_zeros(1)])
        return pair_losses([loss], theta[None]).mean()

    optimiser = torch.optim.LBFGS(
        [free],
        lr=1.0,
        max_iter=max_iter,
        tolerance_grad=1e-12,
        tolerance_change=0.0,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        value = objective()
        value.backward()
        return value

    optimiser.step(closure)
    (grad,) = torch.autograd.grad(objective(), free)
    if grad.abs().max() > 1e-8:
        raise RuntimeError(f"{loss.name}: L-BFGS stopped with gradient {grad.tolist()}; no finite minimiser?")
    return torch.cat([free.detach(), free.new_zeros(1)])


def format_table(losses: list[BanditLoss], snapshots: list[Snapshot]) -> str:
    """One row per loss: pi and log pi/pi_ref at the last snapshot, margins at the first and last, the
    expected-loss optimum."""
    first, last = snapshots[0], snapshots[-1]
    early_head, late_head = f"margins ab/bc/ac at step {first.step}", f"at step {last.step}"
    header = (
        f"{'loss':<26} {'pi(a)':>7} {'pi(b)':>7} {'pi(c)':>7} | {'log pi/pi_ref a/b/c':<21} | {early_head:<30} | "
        f"{late_head:<23} | expected-loss minimiser"
    )
    rows = [header, "-" * len(header)]
    for i, loss in enumerate(losses):
        pi = " ".join(f"{p:7.4f}" for p in last.pi[i].tolist())
        ratios = "/".join(f"{r:.2f}" for r in log_ratios(last.pi[i]).tolist())
        early = "/".join(f"{m:.3f}" for m in first.margins[i].tolist())
        late = "/".join(f"{m:.3f}" for m in last.margins[i].tolist())
        if loss.finite_optimum:
            optimum = "/".join(f"{m:.3f}" for m in margins(expected_loss_minimiser(loss)).tolist())
        else:
            optimum = "none (grows without bound)"
        rows.append(f"{loss.name:<26} {pi} | {ratios:<21} | {early:<30} | {late:<23} | {optimum}")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400, help="first snapshot; training runs 10x as long")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    losses = default_losses()
    snapshots = train(
        losses,
        steps=10 * args.steps,
        snapshot_steps=(args.steps, 10 * args.steps),
        batch_size=args.batch_size,
        seed=args.seed,
    )
    print(format_table(losses, snapshots))


if __name__ == "__main__":
    main()
