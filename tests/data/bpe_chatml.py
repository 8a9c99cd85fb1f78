"""A byte-level BPE tokenizer with a ChatML template whose pre-tokenizer merges whitespace runs, the closest
stand-in for Qwen2.5's that can be built offline: newline runs become one piece and merged tokens such as
"\\n\\n" and "\\n\\n\\n" exist, so an answer that starts with blank lines merges with the "\\n" that ends the
generation prompt when the two are tokenized together."""

from __future__ import annotations

from pathlib import Path

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Newline runs (with any whitespace before them) are one piece; other whitespace runs stay whole unless they
# precede a word; words and single punctuation marks are pieces of their own.
PIECES = r"\s*[\r\n]+|\s+(?!\S)|\s+|[A-Za-z]+|[0-9]|[^\sA-Za-z0-9]+"
CORPUS = [
    "Hello there.\n\nHow are you?\n\n\nFine, thanks.\n",
    "\n\nSure! Here is a list:\n\n- one\n- two\n\n",
    " Hi\n\n\n\nbye\n\n",
    "user\nassistant\nsystem\n\n1+1=2\n",
] * 20


def build_bpe_chatml_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PIECES), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=1
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token="<|endoftext|>"
    )
    fast.chat_template = CHATML
    return fast


def write_bpe_chatml_model(out_dir: Path) -> Path:
    """The tokenizer above and a random hidden-32 Llama over its vocabulary, saved with save_pretrained."""
    from spo_align.tiny import TinyModelShape, build_model

    tokenizer = build_bpe_chatml_tokenizer()
    shape = TinyModelShape(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    build_model(tokenizer, shape).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return Path(out_dir)
