"""Rows of one pair against one row for the whole micro-batch, on the real model: does the CPU packed layout
lose to small matrix products?

    python -m bench rows [--repeats 3] [--threads 2]

The CPU layout (`packed_rows`) forwards each packed row on its own; with ~700-token pairs and `max_length` 1024
a row holds one pair, so every linear layer multiplies a few hundred rows. With attention per sequence
(`sdpa_segments`) the row length costs no attention, so the alternative is one row of all the micro-batch's
sequences. This times a LoRA forward and backward of SmolLM2-135M-Instruct (LoRA r 16 on every linear layer,
attention per sequence) over 8 sequences of 300-390 tokens, as four rows of one pair and as one row,
alternating, and prints wall and CPU seconds of each repetition.
"""

from __future__ import annotations

import time

LENGTHS = (360, 340, 380, 300, 350, 370, 330, 390)
"""Token counts of the 8 sequences: 4 pairs, chosen then rejected, like the bench's real-size pairs."""


def _model(threads: int):  # noqa: ANN202
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from spo_align.packaged_model import materialise
    from spo_align.train.logps import use_segment_attention

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(
        materialise("smollm2-135m-instruct"), attn_implementation="sdpa", dtype=torch.float32
    )
    use_segment_attention(model)
    return get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))


def time_rows(model, rows: list[list[int]], ids: list) -> tuple[float, float]:  # noqa: ANN001
    """(wall, CPU) seconds of one forward and backward with the sequences laid out as `rows`."""
    import torch

    decoder = model.get_base_model().model
    wall, cpu = time.perf_counter(), time.process_time()
    total = None
    for row in rows:
        input_ids = torch.cat([ids[k] for k in row], dim=1)
        positions = torch.cat([torch.arange(LENGTHS[k]) for k in row])[None]
        out = decoder(input_ids=input_ids, position_ids=positions).last_hidden_state.pow(2).mean()
        total = out if total is None else total + out
    assert total is not None
    total.backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - wall, time.process_time() - cpu


def row_split_table(repeats: int = 3, threads: int = 2) -> str:
    import torch

    torch.manual_seed(0)
    model = _model(threads)
    ids = [torch.randint(0, 49_000, (1, n)) for n in LENGTHS]
    layouts = {
        "4 rows of one pair": [[0, 4], [1, 5], [2, 6], [3, 7]],
        "1 row of 4 pairs": [list(range(len(LENGTHS)))],
    }
    lines = ["| repetition | layout | wall (s) | CPU (s) |", "| ---: | --- | ---: | ---: |"]
    for repetition in range(1, repeats + 1):
        for name, rows in layouts.items():
            wall, cpu = time_rows(model, rows, ids)
            lines.append(f"| {repetition} | {name} | {wall:.2f} | {cpu:.2f} |")
    return "\n".join(lines)
