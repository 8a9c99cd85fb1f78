"""What the real-model tests compare spo-align against, computed without spo-align: SmolLM2's chat template
written out by hand, plain tokenizer calls, and one unpadded transformers forward per sequence.

The fp32 bound (`tolerance`) for a summed log-prob of n scored tokens:

    n * (LAYERS * U * z_max)  +  n * U * sum|log p_t|

U = 2^-24 is fp32's unit roundoff. spo-align and this module compute the same function of the same weights
and tokens; they differ only in the order of fp32 sums: the GEMMs of a [2B, L] padded batch, of packed rows
or of one sequence alone are blocked differently, and a masked key (padding, another packed sequence) adds an
exact zero to the attention sums rather than being absent. Each of the model's LAYERS residual blocks can
change the hidden state by a few roundoffs relative to its size, so a logit (at most z_max in magnitude)
and the log-normaliser carry a relative error of order LAYERS * U: the first term, per token. The second
is the fp32 summation of the n token log-probs. With z_max ~ 40 this allows ~7e-5 per token; padded,
packed and single-sequence sums were measured to agree within 4e-6 per token (2e-5 per sequence) on these
rows. A wrong token, a shifted position or a dropped `<|im_end|>` moves a sum far past the bound (masking
`<|im_end|>` as padding moved the chosen mean by 1.8 against a bound of 3e-4); a near-certain token such as
the newline after `<|im_end|>` (~1e-4) could hide in it, which is why test_real_tokens.py checks the scored
tokens themselves, exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
END_OF_TURN = "<|im_end|>\n"
LAYERS = 30
U = 2.0**-24


def template_text(messages: list[dict[str, str]], *, add_generation_prompt: bool) -> str:
    """SmolLM2-Instruct's chat template, by hand: a default system turn when the first message is not one,
    then `<|im_start|>ROLE\\nCONTENT<|im_end|>\\n` per message, then `<|im_start|>assistant\\n` to generate."""
    text = ""
    if messages[0]["role"] != "system":
        text += f"<|im_start|>system\n{DEFAULT_SYSTEM}{END_OF_TURN}"
    for message in messages:
        text += f"<|im_start|>{message['role']}\n{message['content']}{END_OF_TURN}"
    if add_generation_prompt:
        text += "<|im_start|>assistant\n"
    return text


def token_ids(tokenizer: Any, text: str) -> list[int]:
    """The tokenizer's ids of text that already spells the template's special tokens (none added)."""
    return [int(i) for i in tokenizer(text, add_special_tokens=False)["input_ids"]]


@dataclass(frozen=True)
class Scored:
    """Summed log-prob of the scored tokens of one sequence, with what the fp32 bound needs."""

    logp: float
    tokens: int
    z_max: float
    """Largest |logit| at the scored positions."""
    abs_sum: float
    """Sum of |log p| over the scored tokens."""

    @property
    def tolerance(self) -> float:
        return tolerance(self.tokens, self.z_max, self.abs_sum)


def tolerance(tokens: int, z_max: float, abs_sum: float) -> float:
    """The fp32 bound of the module doc."""
    return tokens * LAYERS * U * z_max + tokens * U * abs_sum


def score(model: Any, ids: list[int], scored: list[bool]) -> Scored:
    """Sum of log p(ids[t] | ids[:t]) over the positions t where `scored[t]`, from one unpadded forward
    (fp32 logits, log-softmax and sum in fp64)."""
    import torch

    assert len(ids) == len(scored) and not scored[0]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, :-1].double()
    targets = torch.tensor(ids[1:])
    mask = torch.tensor(scored[1:])
    logps = torch.log_softmax(logits, dim=-1).gather(-1, targets[:, None]).squeeze(-1)[mask]
    return Scored(
        logp=float(logps.sum()),
        tokens=int(mask.sum()),
        z_max=float(logits[mask].abs().max()),
        abs_sum=float(logps.abs().sum()),
    )


def score_answer(model: Any, tokenizer: Any, prompt: list[dict[str, str]], answer: str) -> Scored:
    """An answer's log-prob as the model generates it: after the generation prompt's ids, the ids of the answer
    text followed by the end of turn, tokenized on their own."""
    head = token_ids(tokenizer, template_text(prompt, add_generation_prompt=True))
    tail = token_ids(tokenizer, answer + END_OF_TURN)
    return score(model, head + tail, [False] * len(head) + [True] * len(tail))
