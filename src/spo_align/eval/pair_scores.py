"""Held-out pairwise accuracy: each model's summed log-probs of the chosen and rejected answers of held-out pairs.

`read_pairs` reads a JSONL file of preference pairs in the layout training reads (`prompt`, `chosen`,
`rejected`; `data.pairs.convert_pair_row`), `score_pairs` runs a model over them (a LoRA output merged onto
its base, as `eval.generate` loads it) and returns, per pair, log pi(chosen) and log pi(rejected) summed over
the answer's tokens and the template's end of turn, tokenized exactly as training tokenizes them
(`data.tokenize.tokenize_pair`). `pairwise_accuracy` turns a model's scores and the reference model's into
the share of pairs whose log-ratio margin is positive:

    [log pi(c) - log pi_ref(c)] - [log pi(r) - log pi_ref(r)] > 0

(the implicit-reward accuracy of DPO-style losses, on pairs no run trained on), and `preference_accuracy`
into the share of pairs where the model itself puts more probability on the chosen answer.
Scores are cached per model (`write_scores` / `read_scores`), so a rerun does not score a model again.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spo_align.eval.records import EvalInputError, iter_json_objects


@dataclass(frozen=True)
class HeldOutPair:
    prompt: list[dict[str, str]]
    chosen: str
    rejected: str


PairScore = tuple[float, float]
"""(log pi(chosen), log pi(rejected)), each summed over the answer's scored tokens."""


def read_pairs(path: Path, n: int | None = None) -> list[HeldOutPair]:
    """The first `n` pairs (all with None) of a JSONL pair file; a row that is no pair is an error naming its line."""
    from spo_align.data.messages import RowFormatError
    from spo_align.data.pairs import convert_pair_row

    pairs: list[HeldOutPair] = []
    path = Path(path)
    for number, row in iter_json_objects(path):
        missing = [k for k in ("prompt", "chosen", "rejected") if k not in row]
        if missing:
            raise EvalInputError(f"a held-out pair needs {', '.join(missing)}", path, number)
        try:
            pair = convert_pair_row(row["prompt"], row["chosen"], row["rejected"], f"{path}:{number}")
        except RowFormatError as exc:
            raise EvalInputError(str(exc).removeprefix(f"{path}:{number}: ")) from None
        pairs.append(HeldOutPair(pair["prompt"], pair["chosen"], pair["rejected"]))
        if n is not None and len(pairs) >= n:
            break
    if not pairs:
        raise EvalInputError("no pairs", path)
    return pairs


def answer_logps(model: Any, sequences: Sequence[tuple[list[int], list[int]]]) -> list[float]:
    """Summed log-prob of each (prompt ids, answer ids) answer under `model`, one right-padded batch."""
    import torch

    device = next(model.parameters()).device
    width = max(len(p) + len(a) for p, a in sequences)
    ids = torch.zeros((len(sequences), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    scored = torch.zeros((len(sequences), width), dtype=torch.bool)
    for row, (prompt, answer) in enumerate(sequences):
        full = prompt + answer
        ids[row, : len(full)] = torch.tensor(full)
        mask[row, : len(full)] = 1
        scored[row, len(prompt) : len(full)] = True
    with torch.no_grad():
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
    logps = torch.log_softmax(logits[:, :-1], dim=-1)  # position t predicts token t + 1
    targets = ids[:, 1:].to(device)
    token_logps = logps.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return (token_logps * scored[:, 1:].to(device)).sum(dim=-1).tolist()


def score_pairs(model: Any, tokenizer: Any, pairs: Sequence[HeldOutPair], batch_size: int = 16) -> list[PairScore]:
    """(log pi(chosen), log pi(rejected)) of every pair under `model` (in eval mode), `batch_size` pairs at a time."""
    from spo_align.data.tokenize import tokenize_pair

    scores: list[PairScore] = []
    for start in range(0, len(pairs), batch_size):
        batch = [tokenize_pair(tokenizer, p.prompt, p.chosen, p.rejected) for p in pairs[start : start + batch_size]]
        sums = answer_logps(model, [(t.prompt_ids, t.chosen_ids) for t in batch] + [(t.prompt_ids, t.rejected_ids) for t in batch])
        scores += list(zip(sums[: len(batch)], sums[len(batch) :]))
    return scores


def pairwise_accuracy(policy: Sequence[PairScore], reference: Sequence[PairScore]) -> float:
    """Share of pairs whose log-ratio margin against the reference is positive (a tie counts as wrong)."""
    if len(policy) != len(reference) or not policy:
        raise ValueError(f"pairwise accuracy needs the same pairs scored by both models ({len(policy)} vs {len(reference)})")
    wins = sum((c - rc) - (r - rr) > 0 for (c, r), (rc, rr) in zip(policy, reference))
    return wins / len(policy)


def preference_accuracy(policy: Sequence[PairScore]) -> float:
    """Share of pairs where the model gives the chosen answer a higher summed log-prob than the rejected one."""
    if not policy:
        raise ValueError("no scored pairs")
    return sum(c > r for c, r in policy) / len(policy)


def write_scores(path: Path, source: Path, scores: Sequence[PairScore]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"pairs": str(source), "scores": [list(s) for s in scores]}) + "\n", encoding="utf-8")
    tmp.replace(path)  # a cut run leaves no half file behind


def read_scores(path: Path, source: Path, n: int) -> list[PairScore] | None:
    """Cached scores of these `n` pairs of `source`, or None when there are none (or they are of other pairs)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        scores = [(float(c), float(r)) for c, r in data["scores"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return scores if data.get("pairs") == str(source) and len(scores) == n else None


def score_models(models: Sequence[Any], pairs_file: Path, n: int | None, out_dir: Path, batch_size: int = 16) -> dict[str, list[PairScore]]:
    """Every model (`eval.generate.ModelSpec`) over the held-out pairs, cached as OUT_DIR/<name>.json."""
    from spo_align.eval.generate import load_model_and_tokenizer

    pairs = read_pairs(pairs_file, n)
    result: dict[str, list[PairScore]] = {}
    for spec in models:
        path = out_dir / f"{spec.name}.json"
        cached = read_scores(path, pairs_file, len(pairs))
        if cached is None:
            model, tokenizer = load_model_and_tokenizer(spec, "float32")
            cached = score_pairs(model, tokenizer, pairs, batch_size)
            write_scores(path, pairs_file, cached)
            del model
        result[spec.name] = cached
    return result
