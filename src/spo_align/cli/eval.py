"""`spo eval generate | judge | table`: thin commands over spo_align.eval.

Only typer and the standard library are imported here; the implementation (torch, transformers,
openai, matplotlib) is imported inside each command. Exit codes: 0 done, 1 bad input or failed
judgments, 2 usage error (typer's own).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import typer

REFERENCE_JUDGE = "reference"

eval_app = typer.Typer(
    name="eval",
    help="Generate answers, judge every pair of models, and tabulate win rates.",
    no_args_is_help=True,
)


@contextmanager
def _one_line_errors() -> Iterator[None]:
    """Known failures become one line on stderr and exit code 1, never a traceback."""
    from spo_align.eval.judge import JudgeFatalError
    from spo_align.eval.judge_parse import PromptTemplateError
    from spo_align.eval.records import EvalInputError
    from spo_align.eval.redact import redact

    try:
        yield
    except (EvalInputError, PromptTemplateError, JudgeFatalError) as exc:
        typer.echo(f"error: {redact(str(exc))}", err=True)
        raise typer.Exit(1) from None
    except OSError as exc:
        from spo_align.os_errors import reason

        where = f"{exc.filename}: " if exc.filename else ""
        typer.echo(f"error: {where}{redact(reason(exc))}", err=True)
        raise typer.Exit(1) from None


def _split_models(text: str | None) -> list[str] | None:
    if text is None:
        return None
    names = [m.strip() for m in text.split(",") if m.strip()]
    if not names:
        raise typer.BadParameter("expected a comma-separated list of model names", param_hint="--models")
    return names


@eval_app.command("generate")
def generate_command(
    model: list[str] = typer.Option(..., "--model", help="PATH[=NAME]; repeat for each model. LoRA outputs load on their base."),
    prompts: str = typer.Option(..., "--prompts", help="JSONL file (id, prompt[, reference]) or hub dataset NAME[:SPLIT]."),
    out: Path = typer.Option(..., "--out", help="Directory for one <name>.jsonl per model."),
    n: int | None = typer.Option(None, "--n", help="Use the first N prompts (default: all)."),
    max_new_tokens: int = typer.Option(512, "--max-new-tokens"),
    batch_size: int = typer.Option(8, "--batch-size"),
    temperature: float = typer.Option(0.0, "--temperature", help="0 = greedy (default); > 0 samples with --seed."),
    top_p: float = typer.Option(1.0, "--top-p"),
    seed: int = typer.Option(0, "--seed"),
    engine: str = typer.Option("transformers", "--engine", help="transformers or vllm (if installed)."),
    dtype: str = typer.Option("auto", "--dtype", help="auto, float32, bfloat16 or float16."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Regenerate even when a model's answers are complete."),
) -> None:
    """Generate every model's answers to the test prompts."""
    if engine not in ("transformers", "vllm"):
        raise typer.BadParameter("must be 'transformers' or 'vllm'", param_hint="--engine")
    if dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise typer.BadParameter("must be auto, float32, bfloat16 or float16", param_hint="--dtype")
    with _one_line_errors():
        from spo_align.eval.generate import GenerationSettings, generate, load_prompts, parse_model_spec

        specs = [parse_model_spec(m) for m in model]
        settings = GenerationSettings(
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            engine=engine,  # type: ignore[arg-type]
            dtype=dtype,  # type: ignore[arg-type]
        )
        rows = load_prompts(prompts, n)
        paths = generate(specs, rows, settings, out, skip_existing=not overwrite)
    for path in paths:
        typer.echo(str(path))


@eval_app.command("judge")
def judge_command(
    gen_dir: Path = typer.Argument(..., help="Directory of <model>.jsonl answer files from `spo eval generate`."),
    judge_model: str = typer.Option(..., "--judge-model", help=f"Judge model id (e.g. gpt-4o), or '{REFERENCE_JUDGE}' to compare with known answers."),
    out: Path = typer.Option(..., "--out", help="Judgments JSONL; appended to and resumed from."),
    base_url: str | None = typer.Option(None, "--base-url", help="OpenAI-compatible endpoint, e.g. http://localhost:8000/v1."),
    api_key_env: str = typer.Option("OPENAI_API_KEY", "--api-key-env", help="Environment variable holding the API key."),
    prompt: str = typer.Option("pairwise_v1", "--prompt", help="Shipped judge prompt name or a prompt file."),
    models: str | None = typer.Option(None, "--models", help="Comma-separated subset of models (default: all files)."),
    concurrency: int = typer.Option(8, "--concurrency", min=1, help="Calls in flight at once."),
    timeout: float = typer.Option(60.0, "--timeout", help="Seconds per call before it is retried."),
    max_attempts: int = typer.Option(6, "--max-attempts", min=1, help="Attempts per judgment on 429/5xx/timeouts."),
    parse_retries: int = typer.Option(2, "--parse-retries", min=0, help="Re-asks after an unparseable verdict."),
    max_tokens: int = typer.Option(512, "--max-tokens", min=1, help="Judge reply length limit."),
    retry_errors: bool = typer.Option(False, "--retry-errors", help="Judge again the keys an earlier run recorded as errors."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the number of calls and estimated tokens; call nothing."),
) -> None:
    """Judge every pair of models on every prompt, in both orders."""
    model_names = _split_models(models)
    with _one_line_errors():
        from spo_align.eval.judge import judge_all, plan_judging
        from spo_align.eval.judge_factory import make_judge

        judge = make_judge(
            "reference" if judge_model == REFERENCE_JUDGE else "openai",
            judge_model,
            base_url=base_url,
            api_key_env=api_key_env,
            prompt=prompt,
            timeout_s=timeout,
            max_attempts=max_attempts,
            parse_retries=parse_retries,
            max_tokens=max_tokens,
        )
        if dry_run:
            plan = plan_judging(gen_dir, judge, out, models=model_names, retry_errors=retry_errors)
            typer.echo(
                f"{plan.total} judgments in all: {plan.done} done, {plan.errors_kept} errors kept, "
                f"{plan.identical} identical-answer ties (free)"
            )
            typer.echo(f"calls to make: {plan.calls}")
            typer.echo(
                f"estimated tokens: {plan.est_prompt_tokens} prompt + {plan.est_completion_tokens} completion "
                f"(~4 characters per token; retries not included)"
            )
            return
        summary = judge_all(gen_dir, judge, out, models=model_names, concurrency=concurrency, retry_errors=retry_errors)
    typer.echo(
        f"{summary.out}: {summary.judged} judged now ({summary.identical} identical-answer ties), "
        f"{summary.skipped_done} already done, {summary.errors} errors now, {summary.errors_kept} earlier errors kept; "
        f"tokens used: {summary.prompt_tokens} prompt + {summary.completion_tokens} completion"
    )
    if not summary.complete:
        typer.echo(
            f"error: {summary.total - summary.skipped_done - summary.judged} of {summary.total} judgments failed; "
            "rerun with --retry-errors to try them again",
            err=True,
        )
        raise typer.Exit(1)


@eval_app.command("table")
def table_command(
    judgments: Path = typer.Argument(..., help="Judgments JSONL from `spo eval judge`."),
    out: Path | None = typer.Option(None, "--out", help="Directory for win_rates.md/.csv/.png (default: beside the judgments)."),
    models: str | None = typer.Option(None, "--models", help="Comma-separated row/column order (default: alphabetical)."),
    judge_model: str | None = typer.Option(None, "--judge-model", help="Tabulate only this judge's judgments."),
    prompt_version: str | None = typer.Option(None, "--prompt-version", help="Tabulate only this prompt version."),
    bootstrap: int = typer.Option(1000, "--bootstrap", min=1, help="Bootstrap resamples for the interval."),
    seed: int = typer.Option(0, "--seed", help="Bootstrap seed."),
    heatmap: bool = typer.Option(True, "--heatmap/--no-heatmap", help="Also write the PNG heatmap."),
) -> None:
    """Win-rate matrix (row vs column, ties half) as Markdown, CSV and a heatmap PNG."""
    model_names = _split_models(models)
    with _one_line_errors():
        from spo_align.eval.table import to_markdown, win_rate_table, write_csv, write_heatmap, write_markdown

        table = win_rate_table(
            judgments, models=model_names, judge_model=judge_model, prompt_version=prompt_version,
            n_bootstrap=bootstrap, seed=seed,
        )
        out_dir = out if out is not None else judgments.parent
        out_dir.mkdir(parents=True, exist_ok=True)
        written = [write_markdown(table, out_dir / "win_rates.md"), write_csv(table, out_dir / "win_rates.csv")]
        if heatmap:
            written.append(write_heatmap(table, out_dir / "win_rates.png"))
    typer.echo(to_markdown(table))
    for path in written:
        typer.echo(f"wrote {path}")


def register(app: typer.Typer) -> None:
    """Add `spo eval ...` to the top-level app."""
    app.add_typer(eval_app, name="eval")

