"""`sdpa_segments`: packed rows attended one sequence at a time, without a row-long mask, computing the same
log-probs and gradients as each sequence forwarded alone."""

from __future__ import annotations

import preference_helpers as h
import pytest
import torch

from spo_align.data.collate import PairCollator
from spo_align.train.logps import (
    SEGMENT_SDPA,
    batch_logps,
    batch_token_counts,
    segment_bounds,
    use_segment_attention,
)

torch.set_num_threads(1)
ULPS = 1000
"""Per-token allowance in fp32 ulps of the token's own log-prob magnitude (at least 1 nat): both sides run the
same fp32 operations on the same numbers, differing only in summation order inside the matrix products and
the attention kernel (a 2-layer, hidden-32 model), far below this allowance."""


@pytest.fixture(scope="module")
def setup():
    tok = h.tokenizer()
    ds = h.tokenized_dataset(tok, 24, seed=3, max_length=160, max_answer=120)
    return tok, [ds[i] for i in range(8)]


def _bound(expected: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    eps = torch.finfo(torch.float32).eps
    per_token = (expected.abs() / counts.clamp_min(1)).clamp_min(1.0)
    return ULPS * eps * per_token * counts


def _alone(model, features) -> torch.Tensor:
    """Each sequence forwarded alone through plain sdpa: the ground truth."""
    single = PairCollator(0, "padded")
    out = []
    for key in ("chosen_ids", "rejected_ids"):
        for f in features:
            g = dict(f)
            g["chosen_ids"] = g["rejected_ids"] = f[key]
            out.append(batch_logps(model, single([g]))[0])
    return torch.stack(out)


def test_segment_bounds_split_where_positions_restart():
    assert segment_bounds(torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])) == [(0, 3), (3, 5), (5, 9)]
    assert segment_bounds(torch.arange(5)) == [(0, 5)]
    assert segment_bounds(torch.tensor([0, 0, 0])) == [(0, 1), (1, 2), (2, 3)]


@pytest.mark.parametrize("layout", ["packed_rows", "packed_batch", "packed_single_row", "padded"])
def test_logps_per_sequence_equal_each_sequence_alone(setup, layout):
    tok, features = setup
    reference = h.model(tok)
    expected = _alone(reference, features)
    model = h.model(tok)
    use_segment_attention(model)
    assert model.config._attn_implementation == SEGMENT_SDPA
    batch = PairCollator(tok.pad_token_id, layout, pack_length=200)(features)
    got = batch_logps(model, batch)
    assert (got - expected).abs().le(_bound(expected, batch_token_counts(batch))).all()


def test_gradients_equal_packed_sdpa(setup):
    tok, features = setup
    batch = PairCollator(tok.pad_token_id, "packed_rows", pack_length=200)(features)
    grads = []
    for segments in (False, True):
        model = h.model(tok)
        if segments:
            use_segment_attention(model)
        batch_logps(model, batch).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[1], grads[0], rtol=1e-4, atol=1e-6)


def test_no_mask_and_no_key_beyond_its_sequence(setup, monkeypatch):
    """The kernel sees no mask and keys of one sequence at a time (at most the longest sequence), never a row."""
    tok, features = setup
    seen: list[tuple[bool, int]] = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kwargs):
        seen.append((attn_mask is None, k.shape[2]))
        return real(q, k, v, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    model = h.model(tok)
    use_segment_attention(model)
    batch = PairCollator(tok.pad_token_id, "packed_rows", pack_length=200)(features)
    batch_logps(model, batch)
    longest = max(len(f["prompt_ids"]) + max(len(f["chosen_ids"]), len(f["rejected_ids"])) for f in features)
    assert seen and all(no_mask for no_mask, _ in seen)
    assert max(keys for _, keys in seen) <= longest < int(batch["row_lengths"].max())


def test_a_leaking_layout_is_caught(setup):
    """Negative control: positions that do not restart make one segment of the row, so sequences attend to
    each other and the per-sequence check fails."""
    tok, features = setup
    expected = _alone(h.model(tok), features)
    model = h.model(tok)
    use_segment_attention(model)
    collator = PairCollator(tok.pad_token_id, "packed_rows", pack_length=200, reset_positions=False)
    batch = collator(features)
    got = batch_logps(model, batch)
    assert not (got - expected).abs().le(_bound(expected, batch_token_counts(batch))).all()


def test_only_a_model_running_sdpa_is_switched(setup):
    tok, _ = setup
    model = h.model(tok)
    model.config._attn_implementation = "eager"
    with pytest.raises(ValueError, match="replaces sdpa"):
        use_segment_attention(model)
