"""Write the parity preference task to data/parity/ from nothing but this file (deterministic: same bytes on every run).

    python scripts/make_parity_data.py              # (re)write data/parity/
    python scripts/make_parity_data.py OUT_FOLDER   # write elsewhere (tests/data/test_parity_data.py compares)

The task: "Is 147 even or odd?" The chosen answer states the right parity, the rejected one the wrong
parity in the same words ("147 is odd." / "147 is even."), so the two answers share every token but one:
the case in which DPO is known to push both answers' likelihood down (likelihood displacement). A
held-out answer is checked by a rule (it names exactly one of "even"/"odd", the right one).

Train and held-out numbers come from disjoint ranges, so no held-out number was seen in training:
- `pairs_train.jsonl`: 320 pairs, numbers 100-419 (`prompt` messages, `chosen` / `rejected` text);
- `heldout_pairs.jsonl`: 100 pairs of the same layout, numbers 600-699 (held-out pairwise accuracy);
- `heldout_prompts.jsonl`: the same 100 prompts as `id`, `prompt`, `reference` ("even" or "odd") for greedy
  generation and the rule judge.
Phrasings are drawn with a fixed seed; running this again writes the same bytes (tests/data/test_parity_data.py).
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

TRAIN_NUMBERS = range(100, 420)
HELDOUT_NUMBERS = range(600, 700)
SEED = 0
QUESTIONS = (
    "Is {n} even or odd?",
    "Is the number {n} odd or even?",
    "Is {n} an even or an odd number?",
    "{n}: even or odd?",
)
ANSWERS = (
    "{n} is {parity}.",
    "The number {n} is {parity}.",
    "{n} is an {parity} number.",
)
CHOICES = ("even", "odd")


def parity(n: int) -> str:
    return CHOICES[n % 2]


def _pair(n: int, rng: random.Random) -> tuple[str, dict]:
    question = rng.choice(QUESTIONS).format(n=n)
    answer = rng.choice(ANSWERS)
    right, wrong = parity(n), CHOICES[1 - n % 2]
    pair = {
        "prompt": [{"role": "user", "content": question}],
        "chosen": answer.format(n=n, parity=right),
        "rejected": answer.format(n=n, parity=wrong),
    }
    return question, pair


def make_parity_data() -> dict[str, list[dict]]:
    """File name -> rows, deterministic."""
    rng = random.Random(SEED)
    train = [_pair(n, rng)[1] for n in TRAIN_NUMBERS]
    rng.shuffle(train)  # evens and odds interleaved, phrasings mixed in every batch
    heldout_pairs, prompts = [], []
    for index, n in enumerate(HELDOUT_NUMBERS):
        question, pair = _pair(n, rng)
        heldout_pairs.append(pair)
        prompts.append({"id": f"p{index:03d}", "prompt": question, "reference": parity(n)})
    return {"pairs_train.jsonl": train, "heldout_pairs.jsonl": heldout_pairs, "heldout_prompts.jsonl": prompts}


def render(rows: list[dict]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False, separators=(",", ":")) + "\n" for row in rows)


def write_parity_data(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, rows in make_parity_data().items():
        path = folder / name
        path.write_text(render(rows), encoding="utf-8")
        written.append(path)
    return written


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent / "data" / "parity"
    for path in write_parity_data(target):
        print(path)
