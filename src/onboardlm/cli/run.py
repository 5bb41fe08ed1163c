"""``onboardlm run``: load a model into its lean class and answer prompts."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from onboardlm.cli.common import (
    DEFAULT_PROMPT,
    DType,
    app,
    console,
    reports_user_errors,
)


@app.command("run")
@reports_user_errors
def run_command(
    model: Annotated[
        str | None,
        typer.Option(
            "--model", "-m", help="Model dir, .gguf file, cached hub id or model_type [default: SmolLM2]"
        ),
    ] = None,
    prompt: Annotated[list[str] | None, typer.Option("--prompt", "-p", help="Prompt (repeatable).")] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Tokens to generate per prompt.")] = 32,
    num_hidden_layers: Annotated[int | None, typer.Option(min=1, help="Run with fewer layers.")] = None,
    dtype: Annotated[DType, typer.Option(help="Compute dtype.")] = DType.float32,
    device: Annotated[str, typer.Option(help="Device, e.g. cpu or cuda.")] = "cpu",
) -> None:
    """Load a model into its lean implementation and answer prompts greedily."""
    from onboardlm.models.factory import AutoModelForCausalLMFactory
    from onboardlm.models.source import default_model_path
    from onboardlm.runtime.chat import encode_chat_prompt, stop_token_ids
    from onboardlm.runtime.generate import greedy_generate

    model_name = model or str(default_model_path())
    model_kwargs = {"num_hidden_layers": num_hidden_layers} if num_hidden_layers else {}
    factory = AutoModelForCausalLMFactory(model_name, model_kwargs)
    with console.status(f"loading {Path(model_name).name} ..."):
        tokenizer = factory.tokenizer()
        lean_model, report = factory.build_and_load(device=device, dtype=dtype.to_torch())
    kind = "lean onboardlm model" if report.is_custom else "transformers model (no lean model registered)"
    console.print(
        f"[green]loaded[/] {report.model_class} ({kind}) from {report.weights_source}",
        highlight=False,
        soft_wrap=True,
    )
    stops = stop_token_ids(tokenizer)
    for i, text in enumerate(prompt or [DEFAULT_PROMPT]):
        with console.status(f"generating for prompt {i} ..."):
            result = greedy_generate(
                lean_model, encode_chat_prompt(tokenizer, text), max_new_tokens=max_new_tokens, stop_ids=stops
            )
        answer = tokenizer.decode(result.new_ids, skip_special_tokens=True).strip()
        console.print(f"[PROMPT {i}] {text}: {answer}", highlight=False, markup=False, soft_wrap=True)
