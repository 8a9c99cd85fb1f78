"""Held-out pairwise accuracy (eval/pair_scores.py): the scores of a padded batch are each answer's own log-prob
sum, computed here one unpadded sequence at a time on the embedded tiny model; the accuracies count what they say."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from spo_align.eval.pair_scores import (
    pairwise_accuracy,
    preference_accuracy,
    read_pairs,
    read_scores,
    score_pairs,
    write_scores,
)
from spo_align.eval.records import EvalInputError

ROOT = Path(__file__).resolve().parents[2]
TINY_PAIRS = ROOT / "data" / "tiny" / "pairs_train.jsonl"


def test_pairwise_accuracy_counts_positive_log_ratio_margins_only() -> None:
    reference = [(-5.0, -5.0), (-5.0, -5.0), (-5.0, -5.0), (-2.0, -8.0)]
    policy = [(-4.0, -6.0), (-6.0, -5.5), (-5.0, -5.0), (-3.0, -8.0)]  # margins +2, -0.5, 0 (a tie), -1
    assert pairwise_accuracy(policy, reference) == 0.25
    assert pairwise_accuracy(reference, reference) == 0.0  # a model against itself: every margin is 0
    assert preference_accuracy(policy) == 0.5  # the model itself prefers chosen in pairs 0 and 3
    with pytest.raises(ValueError, match="same pairs"):
        pairwise_accuracy(policy, reference[:2])


def test_scores_are_cached_for_the_same_pairs_only(tmp_path: Path) -> None:
    path = tmp_path / "scores" / "m.json"
    write_scores(path, TINY_PAIRS, [(-1.0, -2.0), (-3.0, -4.0)])
    assert read_scores(path, TINY_PAIRS, 2) == [(-1.0, -2.0), (-3.0, -4.0)]
    assert read_scores(path, TINY_PAIRS, 3) is None and read_scores(path, tmp_path / "other.jsonl", 2) is None
    path.write_text("{", encoding="utf-8")
    assert read_scores(path, TINY_PAIRS, 2) is None


def test_a_row_that_is_no_pair_is_named_by_its_line(tmp_path: Path) -> None:
    bad = tmp_path / "pairs.jsonl"
    bad.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + "\n" + json.dumps({"prompt": "q"}) + "\n")
    with pytest.raises(EvalInputError, match=rf"{bad}:2: a held-out pair needs chosen, rejected"):
        read_pairs(bad)
    assert len(read_pairs(bad, n=1)) == 1


def test_padded_batch_scores_equal_each_answer_scored_alone_on_the_tiny_model(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from spo_align.data.tokenize import tokenize_pair
    from spo_align.tiny import write_tiny_model

    torch.set_num_threads(1)
    folder = write_tiny_model(tmp_path / "tiny")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    pairs = read_pairs(TINY_PAIRS, n=7)
    scores = score_pairs(model, tokenizer, pairs, batch_size=3)  # batches of 3, 3 and 1 pairs, padded

    def alone(prompt: list[int], answer: list[int]) -> float:
        ids = torch.tensor([prompt + answer])
        with torch.no_grad():
            logps = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), dim=-1)
        return sum(float(logps[len(prompt) - 1 + i, token]) for i, token in enumerate(answer))

    assert len(scores) == 7
    for pair, (chosen, rejected) in zip(pairs, scores):
        t = tokenize_pair(tokenizer, pair.prompt, pair.chosen, pair.rejected)
        assert t.chosen_ids and t.rejected_ids and t.chosen_ids != t.rejected_ids
        # fp32 sums of a handful of tokens, padded against unpadded: far inside 1e-4 nats
        assert chosen == pytest.approx(alone(t.prompt_ids, t.chosen_ids), abs=1e-4)
        assert rejected == pytest.approx(alone(t.prompt_ids, t.rejected_ids), abs=1e-4)
