"""Packed-vs-padded errors and the leaking control's, against the packing check's bound, on CPU models.

    OMP_NUM_THREADS=1 python -m bench.packing_errors smollm2 FOLDER   (real SmolLM2, fp32, sdpa and eager)
    OMP_NUM_THREADS=1 python -m bench.packing_errors tiny             (tiny Llama, fp32 and bf16, two inits)
    OMP_NUM_THREADS=1 python -m bench.packing_errors unit             (random toy / 6-layer Qwen2 shapes,
                                                                       default init vs `context_sensitive`)

One line per model, dtype, kernel and layout: the worst sequence's difference over its bound for the packed
layout (under 1 passes) and for the leaking control (over 1 fails, as it must). docs/packing.md holds the
figures. The bf16 runs use small models only: CPU bf16 matrix products are far too slow for a 135M model.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

import torch

from bench.packing_check import chat_features, check_packing

REPO = Path(__file__).resolve().parents[1]
LAYOUTS = ("packed_rows", "packed_batch", "packed_single_row")


def report(name: str, model: Any, features: list, pad: int, pack_length: int, batch_size: int = 4) -> None:
    for layout in LAYOUTS:
        r = check_packing(
            model, features, pad_token_id=pad, layout=layout, pack_length=pack_length, batch_size=batch_size
        )
        p, c = r["packed_vs_padded"], r["control_vs_padded"]
        print(
            f"{name} {r['dtype']} {layout}: packed worst {p['worst']['ratio']:.3g}x bound "
            f"({p['worst']['abs_diff']:.3g} nats); control worst {c['worst']['ratio']:.3g}x "
            f"({c['worst']['abs_diff']:.3g} nats, {c['sequences_over_bound']}/{r['sequences']} over); "
            f"mean logit scale {r['mean_logit_scale']:.3g}",
            flush=True,
        )


def _tiny() -> None:
    sys.path.insert(0, str(REPO / "tests" / "train"))
    import preference_helpers as h

    tok = h.tokenizer()
    ds = h.tokenized_dataset(tok, 8, seed=3, max_length=160, max_answer=120)
    features = [ds[i] for i in range(8)]
    for dtype in (torch.float32, torch.bfloat16):
        for attention in ("sdpa", "eager"):
            for spread in (0.0, 0.3):
                model = h.model(tok, spread=spread).to(dtype)
                model.set_attn_implementation(attention)
                report(f"tiny spread={spread} {attention}", model, features, tok.pad_token_id, 200)


def _unit() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bench.config import TOY_SHAPE, LengthModel
    from bench.logp_check import _features, context_sensitive
    from bench.pairs import make_pairs, write_jsonl, write_model

    mini = dataclasses.replace(
        TOY_SHAPE, hidden_size=128, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=352, vocab_size=2048, architecture="qwen2",
    )
    work = REPO / "bench" / "results" / "tmp" / "packing-errors"
    lengths = LengthModel(prompt_median=12, response_median=24, max_length=128)
    for name, shape in (("toy", TOY_SHAPE), ("mini", mini)):
        folder = write_model(work / name, shape, seed=3)
        tok = AutoTokenizer.from_pretrained(folder)
        pairs = write_jsonl(make_pairs(8, lengths, shape.vocab_size, 0), work / f"pairs-{name}.jsonl")
        features = _features(tok, pairs, 8)
        for dtype in (torch.float32, torch.bfloat16):
            for attention in ("sdpa", "eager"):
                for label in ("default", "unit"):
                    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation=attention)
                    model = context_sensitive(model.eval()) if label == "unit" else model.eval()
                    report(f"{name}-{label} {attention}", model.to(dtype), features, tok.pad_token_id, 128, 2)


def _smollm2(folder: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    features = chat_features(tok)
    for attention in ("sdpa", "eager"):
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation=attention)
        report(f"smollm2 {attention}", model.eval(), features, tok.pad_token_id, 160)


def main(argv: list[str]) -> None:
    torch.set_num_threads(1)
    if argv[:1] == ["smollm2"] and len(argv) == 2:
        _smollm2(argv[1])
    elif argv == ["tiny"]:
        _tiny()
    elif argv == ["unit"]:
        _unit()
    else:
        raise SystemExit("usage: python -m bench.packing_errors smollm2 FOLDER | tiny | unit")


if __name__ == "__main__":
    main(sys.argv[1:])
