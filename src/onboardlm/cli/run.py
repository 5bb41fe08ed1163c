"""``onboardlm run``: export a model with a KV cache and answer prompts, with registry settings."""

from __future__ import annotations

import time
from contextlib import nullcontext
from pathlib import Path
from typing import Annotated, Any

import typer

from onboardlm.cli.common import (
    CUSTOM_MODEL_DIR_HELP,
    DType,
    Quantize,
    app,
    console,
    load_custom_model_dirs,
    reports_user_errors,
)
from onboardlm.errors import OnboardlmError


def settings_with_overrides(base: Any, overrides: dict[str, Any]) -> Any:
    """``base`` RunSettings with the command-line values that were given, validated again."""
    from pydantic import ValidationError

    from onboardlm.registry import RunSettings, deep_merge
    from onboardlm.registry.settings import field_problems

    given = {key: value for key, value in overrides.items() if value is not None}
    if "sampling" in overrides:
        given["sampling"] = {k: v for k, v in overrides["sampling"].items() if v is not None}
    data = deep_merge(base.model_dump(), given)
    try:
        return RunSettings.model_validate(data)
    except ValidationError as err:
        problems = "; ".join(f"{p.key}: {p.message}" if p.key else p.message for p in field_problems(err))
        raise OnboardlmError("command-line options", problems) from None


@app.command("run")
@reports_user_errors
def run_command(
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            "-m",
            help="Registry name, model dir, .gguf file, cached hub id or model_type [default: the shipped SmolLM2]",
        ),
    ] = None,
    use_registry: Annotated[
        bool, typer.Option("--use-registry", help="Apply the model's registry entry (models.yaml + configs).")
    ] = False,
    yaml_extra: Annotated[
        list[Path] | None,
        typer.Option(
            "--args.yaml-extra", "--yaml-extra", help="Settings YAML, merged after the registry (repeatable)."
        ),
    ] = None,
    registry_dir: Annotated[
        Path | None, typer.Option("--registry-dir", help="Registry directory [default: the shipped one].")
    ] = None,
    prompt: Annotated[
        list[str] | None,
        typer.Option("--prompt", "-p", help="Prompt (repeatable) [default: the 10 default prompts]."),
    ] = None,
    max_new_tokens: Annotated[int | None, typer.Option(min=1, help="Tokens to generate per prompt.")] = None,
    num_hidden_layers: Annotated[int | None, typer.Option(min=1, help="Run with fewer layers.")] = None,
    dtype: Annotated[DType | None, typer.Option(help="Compute dtype [default: from the settings].")] = None,
    quantize: Annotated[
        Quantize | None,
        typer.Option(
            help="fp8: run a float checkpoint's linears in FP8 (weights per channel, activations per token) "
            "[default: from the settings; FP8 checkpoints always load in FP8]."
        ),
    ] = None,
    device: Annotated[str | None, typer.Option(help="cpu or cuda [default: from the settings].")] = None,
    max_batch_size: Annotated[
        int | None, typer.Option(min=1, help="Sequences per batch (cache rows).")
    ] = None,
    max_seq_len: Annotated[
        int | None, typer.Option(min=2, help="Longest prompt + answer the cache holds.")
    ] = None,
    temperature: Annotated[float | None, typer.Option(min=0.0, help="0 = greedy.")] = None,
    top_p: Annotated[float | None, typer.Option(help="Nucleus sampling mass.")] = None,
    top_k: Annotated[
        int | None, typer.Option(min=0, help="Sample from the k most likely tokens (0 = all).")
    ] = None,
    seed: Annotated[int | None, typer.Option(min=0, help="Sampling seed.")] = None,
    world_size: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Tensor-parallel ranks [default: from the settings]; launch with "
            "torchrun --nproc-per-node N -m onboardlm.cli run ... --world-size N.",
        ),
    ] = None,
    custom_model_dir: Annotated[
        list[Path] | None, typer.Option("--custom-model-dir", help=CUSTOM_MODEL_DIR_HELP)
    ] = None,
) -> None:
    """Export a model to a graph with a KV cache and answer prompts; log ``[PROMPT i] <prompt>: <output>``."""
    from onboardlm.registry import load_run_settings
    from onboardlm.runtime.prompts import check_prompts
    from onboardlm.runtime.runner import DEFAULT_MODEL_ID
    from onboardlm.runtime.tensor_parallel import close_process_group

    check_prompts(prompt or [])  # before the model loads
    load_custom_model_dirs(custom_model_dir)
    registry_name = model or DEFAULT_MODEL_ID
    settings = load_run_settings(
        registry_name, use_registry=use_registry, yaml_extra=yaml_extra or [], registry_dir=registry_dir
    )
    model_kwargs = {"num_hidden_layers": num_hidden_layers} if num_hidden_layers else None
    overrides = {
        "max_new_tokens": max_new_tokens,
        "world_size": world_size,
        "dtype": dtype.value if dtype else None,
        "quantize": quantize.value if quantize else None,
        "device": device,
        "max_batch_size": max_batch_size,
        "max_seq_len": max_seq_len,
        "model_kwargs": model_kwargs,
        "sampling": {"temperature": temperature, "top_p": top_p, "top_k": top_k, "seed": seed},
    }
    settings = settings_with_overrides(settings, overrides)
    try:
        _load_and_run(model, settings, prompt)
    finally:
        close_process_group()


def _load_and_run(model: str | None, settings: Any, prompt: list[str] | None) -> None:
    from onboardlm.runtime.distributed import RankInfo
    from onboardlm.runtime.runner import DEFAULT_MODEL_ID, Runner
    from onboardlm.runtime.timings import process_age_s

    quiet = settings.world_size > 1 and RankInfo.from_env().rank != 0  # rank 0 prints for all
    with (
        console.status(f"loading and exporting {model or DEFAULT_MODEL_ID} ...")
        if not quiet
        else nullcontext()
    ):
        start_up_s = process_age_s()
        runner = Runner.load(model, settings)
    runner.timings.start_up_s = start_up_s
    if quiet:
        runner.run(prompt)
        return
    report = runner.report
    kind = "lean onboardlm model" if report.is_custom else "transformers model (no lean model registered)"
    caches = runner.graph.caches
    states = sum(not spec.per_token for spec in caches)  # conv / SSM / delta-rule state of hybrid layers
    dtype = next((spec.dtype for spec in caches if spec.per_token), caches[0].dtype)
    console.print(
        f"[green]loaded[/] {report.model_class} ({kind}) from {report.weights_source}; "
        f"{(len(caches) - states) // 2} cached attention layers, "
        + (f"{states} cached states, " if states else "")
        + f"{str(dtype).removeprefix('torch.')} on {runner.device}"
        + (f", tensor parallel over {settings.world_size} ranks" if settings.world_size > 1 else "")
        + "".join(f"; {note}" for note in report.notes),
        highlight=False,
        soft_wrap=True,
    )
    started = time.perf_counter()
    with console.status("generating ..."):
        results = runner.run(prompt)
    seconds = time.perf_counter() - started
    for result in results:
        console.print(result.log_line(), highlight=False, markup=False, soft_wrap=True)
    new_tokens = sum(len(result.new_token_ids) for result in results)
    console.print(
        f"[green]generated[/] {new_tokens} tokens for {len(results)} prompts in {seconds:.2f} s "
        f"({new_tokens / seconds:.1f} tok/s, prompt processing and warm-up included)",
        highlight=False,
        soft_wrap=True,
    )
    console.print(f"[green]timings[/] {runner.timings.summary()}", highlight=False, soft_wrap=True)
