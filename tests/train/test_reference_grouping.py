"""Precomputed reference log-probs under bf16 give step-0 log-ratios of exactly 0.0 for every pair.

In bf16 a sequence's log-prob depends on its batch companions (the padded width, the packed row, the matmul
shapes), so the table must be computed in the very micro-batches training uses. Step 0 covers every pair
here: 12 pairs, micro-batches of 4, 3 accumulation steps, one optimizer step, so every forward runs with the
starting weights, which are the reference; the eval split's table is checked the same way."""

from __future__ import annotations

import preference_helpers as h
import pytest
import torch

from spo_align.data.collate import PairCollator
from spo_align.losses.pair import PairInputs
from spo_align.losses.registry import build_pair_loss
from spo_align.losses.spo import SPOLoss
from spo_align.train.preference_trainer import PreferenceTrainer, ReferenceSpec

torch.set_num_threads(1)


@pytest.mark.parametrize("layout", ["padded", "packed_rows", "packed_batch"])
def test_precomputed_bf16_reference_gives_exactly_zero_step0_log_ratios(tmp_path, layout):
    tok = h.tokenizer()
    ds = h.tokenized_dataset(tok, 12, seed=5)
    spo = build_pair_loss(SPOLoss(type="spo"))
    seen: list[PairInputs] = []

    def recording_loss(pairs: PairInputs):
        seen.append(pairs)
        return spo(pairs)

    trainer = PreferenceTrainer(
        model=h.model(tok, spread=0.2),
        # learning rate 0: the weights stay the reference's, so evaluation after the step is exact too
        args=h.training_args(tmp_path / "run", bf16=True, max_steps=1, gradient_accumulation_steps=3,
                             learning_rate=0.0, per_device_eval_batch_size=3),
        train_dataset=ds,
        eval_dataset=h.tokenized_dataset(tok, 7, seed=9),
        data_collator=PairCollator(tok.pad_token_id, layout, pack_length=128),
        processing_class=tok,
        pair_loss=recording_loss,
        reference=ReferenceSpec(
            kind="precomputed", cache_dir=tmp_path / "cache",
            settings={"max_length": 128, "layout": layout, "pack_length": 128},
        ),
    )
    trainer.train()
    assert len(seen) == 3
    chosen = torch.cat([(p.policy_chosen - p.ref_chosen).detach() for p in seen])
    rejected = torch.cat([(p.policy_rejected - p.ref_rejected).detach() for p in seen])
    assert chosen.numel() == rejected.numel() == 12
    assert chosen.tolist() == [0.0] * 12 and rejected.tolist() == [0.0] * 12, (chosen.tolist(), rejected.tolist())
    assert trainer.args.bf16  # the forwards ran under bf16 autocast (fp32 master weights)
    seen.clear()
    trainer.evaluate()  # 7 eval pairs in micro-batches of 3, 3, 1
    ratios = torch.cat([torch.cat([p.policy_chosen - p.ref_chosen, p.policy_rejected - p.ref_rejected]) for p in seen])
    assert ratios.numel() == 14 and ratios.tolist() == [0.0] * 14, ratios.tolist()


def test_the_cache_key_follows_the_grouping_and_the_precision(tmp_path):
    """A table computed over other micro-batches or in another precision is not exact for this run: not reused."""
    tok = h.tokenizer()
    ds = h.tokenized_dataset(tok, 12, seed=5)

    def keys(**args):
        trainer = PreferenceTrainer(
            model=h.model(tok), args=h.training_args(tmp_path / "run", **args), train_dataset=ds,
            data_collator=PairCollator(tok.pad_token_id, "packed_rows", pack_length=128), processing_class=tok,
            pair_loss=build_pair_loss(SPOLoss(type="spo")),
            reference=ReferenceSpec(kind="precomputed", cache_dir=tmp_path / "cache", settings={"layout": "packed_rows"}),
        )
        trainer.read_reference_tables()
        return trainer._keys["train"].settings

    base = keys()
    assert keys() == base
    assert keys(per_device_train_batch_size=3) != base
    assert keys(data_seed=1) != base
    assert keys(bf16=True) != base
