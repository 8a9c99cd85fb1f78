"""The `eval:` section of an experiment file: test prompts, held-out pairs, generation settings and the judge.

Plain pydantic sections (no torch), read by `experiment/spec.py` as part of the `Experiment` schema.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictStr, model_validator


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, allow_inf_nan=False)


class GenerationSection(_Section):
    """How every model answers the test prompts (the seed is the experiment's seed)."""

    max_new_tokens: int = Field(512, gt=0)
    batch_size: int = Field(8, gt=0)
    temperature: float = Field(0.0, ge=0, description="0 means greedy decoding.")
    top_p: float = Field(1.0, gt=0, le=1)
    engine: Literal["transformers", "vllm"] = Field("transformers", description="vllm only when installed.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto")


class JudgeSection(_Section):
    """Who decides which of two answers is better."""

    type: Literal["reference", "openai"] = Field(
        description="reference: a right answer beats a wrong one, else a tie (needs reference answers; offline). "
        "openai: any OpenAI-compatible chat API."
    )
    model: str | None = Field(None, description="openai: the judge model, e.g. gpt-4o.")
    base_url: str | None = Field(None, description="openai: API base URL for a local or other compatible server.")
    api_key_env: str = Field("OPENAI_API_KEY", description="openai: environment variable holding the API key.")
    concurrency: int = Field(8, gt=0, description="openai: judge calls in flight at once.")
    match: Literal["exact", "choice"] = Field(
        "exact",
        description="reference: when an answer is right. exact: it equals the reference (whitespace stripped). "
        "choice: it names exactly one of `choices` (whole words, any case) and that one is the reference.",
    )
    choices: list[StrictStr] = Field(
        default_factory=list, description="reference, match choice: the possible answers, e.g. [even, odd]."
    )

    @model_validator(mode="after")
    def _fields_match_type(self) -> JudgeSection:
        if self.type == "openai" and not self.model:
            raise ValueError("judge type 'openai' needs 'model' (e.g. gpt-4o)")
        if self.type == "reference" and (self.model is not None or self.base_url is not None):
            raise ValueError("judge type 'reference' takes no 'model' or 'base_url'")
        if self.type == "openai" and (self.match != "exact" or self.choices):
            raise ValueError("judge type 'openai' takes no 'match' or 'choices' (they are the reference judge's rule)")
        if self.match == "choice" and (len(self.choices) < 2 or len({c.lower() for c in self.choices}) < len(self.choices)
                                       or any(not c.strip() for c in self.choices)):
            raise ValueError("match 'choice' needs at least two distinct, non-empty choices, e.g. choices: [even, odd]")
        if self.match == "exact" and self.choices:
            raise ValueError("'choices' needs match: choice")
        return self


class EvalSection(_Section):
    prompts: str = Field(
        description="Test prompts: a JSONL file (id, prompt, optional reference; relative to the experiment "
        "file) or a hub dataset as name:split, e.g. HuggingFaceH4/ultrafeedback_binarized:test_prefs."
    )
    n: int | None = Field(200, gt=0, description="Use the first n prompts; null for all.")
    generation: GenerationSection = Field(default_factory=GenerationSection)
    judge: JudgeSection
    accuracy_by: str | None = Field(
        None,
        description="Field of the JSONL prompt file to break reference accuracy down by (true/false fields "
        "give columns '<field>' and 'no-<field>'). Needs reference answers.",
    )
    n_bootstrap: int = Field(1000, gt=0, description="Bootstrap resamples for the win-rate intervals.")
    pairs: str | None = Field(
        None,
        description="Held-out preference pairs (a JSONL file in the pairs layout, relative to the experiment file; the "
        "first n): every model's pairwise accuracy on them, the share whose log-ratio margin against the model the "
        "runs start from is positive (summary.md).",
    )
