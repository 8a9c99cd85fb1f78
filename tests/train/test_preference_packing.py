"""Packed preference batches are a layout change only: same log-probs, same loss, same gradients."""

from __future__ import annotations

import preference_helpers as h
import pytest
import torch

from spo_align.data.collate import PairCollator, choose_layout, layout_stats
from spo_align.losses.dpo import DPOLoss
from spo_align.losses.dpop import DPOPLoss
from spo_align.losses.ipo import IPOLoss
from spo_align.losses.registry import build_pair_loss, loss_entry
from spo_align.losses.simpo import SimPOLoss
from spo_align.losses.spo import SPOLoss
from spo_align.train.logps import batch_logps, batch_token_counts
from spo_align.train.preference_trainer import PreferenceTrainer, ReferenceSpec

torch.set_num_threads(1)
REL = 1e-5


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


@pytest.fixture(scope="module")
def setup():
    tok = h.tokenizer()
    ds = h.tokenized_dataset(tok, 24, seed=3, max_length=160, max_answer=120)
    return tok, ds


def _unpadded_logps(model, features) -> torch.Tensor:
    """Each sequence forwarded alone, no padding: the ground truth."""
    single = PairCollator(0, "padded")
    out = []
    for key in ("chosen_ids", "rejected_ids"):
        for f in features:
            g = dict(f)
            g["chosen_ids"] = g["rejected_ids"] = f[key]
            out.append(batch_logps(model, single([g]))[0])
    return torch.stack(out)


@pytest.mark.parametrize("layout", ["packed_rows", "packed_batch", "packed_single_row", "padded"])
def test_packed_sequence_logps_equal_unpacked(setup, layout):
    tok, ds = setup
    model = h.model(tok)
    features = [ds[i] for i in range(8)]
    expected = _unpadded_logps(model, features)
    got = batch_logps(model, PairCollator(tok.pad_token_id, layout, pack_length=200)(features))
    assert got.shape == expected.shape == (16,)
    assert _rel(got, expected) < REL


@pytest.mark.parametrize("layout", ["packed_rows", "packed_batch", "packed_single_row", "padded"])
def test_token_counts_are_the_answer_lengths_in_every_layout(setup, layout):
    tok, ds = setup
    features = [ds[i] for i in range(8)]
    counts = batch_token_counts(PairCollator(tok.pad_token_id, layout, pack_length=200)(features))
    expected = [len(f["chosen_ids"]) for f in features] + [len(f["rejected_ids"]) for f in features]
    assert counts.tolist() == expected


def test_rows_hold_several_pairs_and_positions_restart(setup):
    tok, ds = setup
    batch = PairCollator(tok.pad_token_id, "packed_rows", pack_length=200)([ds[i] for i in range(8)])
    lengths = batch["row_lengths"].tolist()
    assert len(lengths) < 8 and max(lengths) <= 200  # pairs share rows
    pos = batch["position_ids"][0]
    assert int((pos == 0).sum()) == 16  # one restart per sequence
    assert int(batch["num_real_tokens"]) == sum(lengths) == batch["input_ids"].shape[1]


def _trainer(tok, ds, tmp_path, loss, layout, reset_positions=True, **args):
    policy = h.model(tok, seed=0, spread=0.3)
    ref = h.model(tok, seed=1, spread=0.3)
    reference = ReferenceSpec(kind="model", model=ref) if loss_entry(loss).needs_reference else ReferenceSpec(kind="none")
    collator = PairCollator(tok.pad_token_id, layout, pack_length=200, reset_positions=reset_positions)
    return PreferenceTrainer(
        model=policy,
        args=h.training_args(tmp_path / layout, **{"per_device_train_batch_size": 8, **args}),
        train_dataset=ds,
        data_collator=collator,
        processing_class=tok,
        pair_loss=build_pair_loss(loss),
        reference=reference,
    )


def _loss_and_grads(trainer, features):
    model = trainer.model
    model.zero_grad()
    batch = trainer.data_collator(features)
    loss = trainer.compute_loss(model, batch)
    loss.backward()
    grads = torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])
    return loss.detach(), grads


LOSSES = {
    "spo": SPOLoss(type="spo", beta=0.2, alpha=1.0),
    "dpo": DPOLoss(type="dpo", beta=0.1, label_smoothing=0.1),
    "ipo": IPOLoss(type="ipo", tau=0.1),
    "dpop": DPOPLoss.model_validate({"type": "dpop", "beta": 0.1, "lambda": 5.0}),
    "simpo": SimPOLoss(type="simpo", beta=2.0, gamma=0.5),  # per-token: needs the same token counts in every layout
    "dpo_nll": DPOLoss(type="dpo", beta=0.1, label_smoothing=0.1, nll_weight=0.5),
}


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_first_step_loss_and_gradients_equal_unpadded(setup, tmp_path, name):
    tok, ds = setup
    features = [ds[i] for i in range(8)]
    base_loss, base_grads = _loss_and_grads(_trainer(tok, ds, tmp_path, LOSSES[name], "padded"), features)
    for layout in ("packed_rows", "packed_batch"):
        loss, grads = _loss_and_grads(_trainer(tok, ds, tmp_path, LOSSES[name], layout), features)
        assert _rel(loss, base_loss) < REL, layout
        assert _rel(grads, base_grads) < REL, layout
    # Control: without the position reset the sequences of a row see each other; the comparison must fail.
    loss, grads = _loss_and_grads(_trainer(tok, ds, tmp_path, LOSSES[name], "packed_rows", reset_positions=False), features)
    assert _rel(grads, base_grads) > 1e-2
    assert _rel(loss, base_loss) > 1e-4


def test_first_optimizer_step_equal_packed_vs_padded(setup, tmp_path):
    """Through Trainer.train(): after one SGD step the weights agree (sampler yields the same pairs)."""
    tok, ds = setup
    weights = {}
    for layout in ("padded", "packed_rows", "packed_single_row"):  # single row: with its flash boundary kwargs
        trainer = _trainer(tok, ds, tmp_path, LOSSES["spo"], layout, max_steps=1, learning_rate=0.5)
        trainer.train()
        weights[layout] = torch.cat([p.detach().reshape(-1) for p in trainer.model.parameters()])
        assert trainer.real_tokens > 0
    start = torch.cat([p.detach().reshape(-1) for p in h.model(tok, seed=0, spread=0.3).parameters()])
    assert _rel(weights["packed_rows"] - start, weights["padded"] - start) < REL
    assert _rel(weights["packed_single_row"] - start, weights["padded"] - start) < REL
    assert float((weights["padded"] - start).abs().max()) > 0


def test_layout_choice_is_explicit():
    assert choose_layout(False, "flash_attention_2", "cuda") == "padded"
    assert choose_layout(True, "flash_attention_2", "cuda") == "packed_single_row"
    assert choose_layout(True, "sdpa", "cuda") == "packed_batch"
    assert choose_layout(True, "sdpa", "cpu") == "packed_rows"
    assert choose_layout(True, "eager", "cpu") == "packed_rows"


def test_padding_share_of_long_tailed_data(setup):
    _, ds = setup
    p, c, r = (list(map(len, ds[k])) for k in ("prompt_ids", "chosen_ids", "rejected_ids"))
    stats = layout_stats(p, c, r, 8, 200, "packed_rows")
    assert stats.packed_share == 0.0 and stats.packed_tokens == stats.real_tokens
    assert stats.padded_share > 0.3  # long tail: most of a padded batch is padding
    batched = layout_stats(p, c, r, 8, 200, "packed_batch")
    assert batched.padded_share == stats.padded_share and batched.packed_share < stats.padded_share


def test_gradient_accumulation_matches_one_big_batch(setup, tmp_path):
    """Guards our use of Trainer internals: compute_loss returns a per-micro-batch mean, so the Trainer
    must divide by the accumulation steps (model_accepts_loss_kwargs / loss_is_scaled_for_ga off)."""
    tok, ds = setup
    start = torch.cat([p.detach().reshape(-1) for p in h.model(tok, seed=0, spread=0.3).parameters()])
    deltas = []
    for batch, accumulation in ((8, 1), (4, 2)):
        trainer = _trainer(tok, ds, tmp_path, LOSSES["dpo"], "packed_rows", max_steps=1, learning_rate=0.5,
                           per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation)
        trainer.train()
        deltas.append(torch.cat([p.detach().reshape(-1) for p in trainer.model.parameters()]) - start)
    assert _rel(deltas[1], deltas[0]) < REL


def test_balanced_rows_never_cost_more_than_plain_bfd():
    import random

    from spo_align.data.collate import balanced_rows
    from spo_align.data.packing import pack_pairs

    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(1, 12)
        c = [rng.randint(1, 300) for _ in range(n)]
        r = [rng.randint(1, 300) for _ in range(n)]
        plain, balanced = pack_pairs(c, r, 600), balanced_rows(c, r, 600)
        assert sorted(i for row in balanced.rows for i in row) == list(range(n))
        cost = [len(p.rows) * max(sum(c[i] + r[i] for i in row) for row in p.rows) for p in (balanced, plain)]
        assert cost[0] <= cost[1]


def test_single_row_boundaries_are_the_sequence_starts(setup):
    tok, ds = setup
    features = [ds[i] for i in range(8)]
    batch = PairCollator(tok.pad_token_id, "packed_single_row")(features)
    seg, pos = batch["segment_ids"][0], batch["position_ids"][0]
    starts = [0] + [t for t in range(1, seg.numel()) if seg[t] != seg[t - 1]] + [seg.numel()]
    cu = batch["cu_seq_lens_q"]
    assert cu.dtype == torch.int32 and cu.tolist() == starts and len(starts) == 17
    assert (pos[cu[:-1].long()] == 0).all() and batch["cu_seq_lens_k"] is cu
    longest = max(len(f["prompt_ids"]) + len(f[k]) for f in features for k in ("chosen_ids", "rejected_ids"))
    assert batch["max_length_q"] == batch["max_length_k"] == longest and isinstance(batch["max_length_q"], int)
    # Only the flash layout carries them: the others run kernels that read the packing from position_ids.
    for layout in ("padded", "packed_rows", "packed_batch"):
        assert "cu_seq_lens_q" not in PairCollator(tok.pad_token_id, layout, pack_length=200)(features)
    # The control layout without position resets is one sequence, and its boundaries say so.
    control = PairCollator(tok.pad_token_id, "packed_single_row", reset_positions=False)(features)
    assert control["cu_seq_lens_q"].tolist() == [0, seg.numel()]


def _attention_kwargs(model) -> list[dict]:
    """Record the kwargs every self-attention module of the (real, transformers) Llama receives."""
    seen: list[dict] = []
    for layer in model.model.layers:
        layer.self_attn.register_forward_pre_hook(lambda _m, _a, kw: seen.append(dict(kw)), with_kwargs=True)
    return seen


def test_trainer_forward_passes_the_boundaries_to_every_attention_call_and_sdpa_ignores_them(setup, tmp_path):
    tok, ds = setup
    features = [ds[i] for i in range(8)]
    trainer = _trainer(tok, ds, tmp_path, LOSSES["spo"], "packed_single_row")
    batch = trainer.data_collator(features)
    seen = _attention_kwargs(trainer.model)
    trainer.compute_loss(trainer.model, batch)
    policy_calls = seen[: len(trainer.model.model.layers)]
    assert len(policy_calls) == 2
    for kw in policy_calls:
        assert torch.equal(kw["cu_seq_lens_q"], batch["cu_seq_lens_q"]) and kw["max_length_q"] == batch["max_length_q"]
        assert torch.equal(kw["cu_seq_lens_k"], batch["cu_seq_lens_k"]) and kw["max_length_k"] == batch["max_length_k"]
    # sdpa (and eager) read the packing from position_ids: with or without the kwargs, the same numbers.
    model = h.model(tok, spread=0.3)
    for attention in ("sdpa", "eager"):
        model.set_attn_implementation(attention)
        without = {k: v for k, v in batch.items() if not k.startswith(("cu_seq_lens", "max_length"))}
        assert torch.equal(batch_logps(model, batch), batch_logps(model, without)), attention
        padded = batch_logps(model, PairCollator(tok.pad_token_id, "padded")(features))
        assert _rel(batch_logps(model, batch), padded) < REL, attention
