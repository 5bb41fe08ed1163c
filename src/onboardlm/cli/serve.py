"""``onboardlm serve``: an OpenAI-compatible HTTP server over a model, with ``run``'s settings."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from onboardlm.cli.common import DType, Quantize, app, console, reports_user_errors
from onboardlm.cli.run import settings_with_overrides
from onboardlm.errors import OnboardlmError


@app.command("serve")
@reports_user_errors
def serve_command(
    model: Annotated[
        str | None,
        typer.Argument(
            help="Registry name, model dir, .gguf file, cached hub id or model_type [default: the shipped SmolLM2]"
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
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port (0: any free port).")] = 8000,
    served_model_name: Annotated[
        str | None,
        typer.Option(help="Model name clients send [default: MODEL, else the default model's id]."),
    ] = None,
    max_new_tokens: Annotated[
        int | None, typer.Option(min=1, help="Default max_tokens of a request.")
    ] = None,
    num_hidden_layers: Annotated[int | None, typer.Option(min=1, help="Serve with fewer layers.")] = None,
    dtype: Annotated[DType | None, typer.Option(help="Compute dtype [default: from the settings].")] = None,
    quantize: Annotated[
        Quantize | None,
        typer.Option(
            help="fp8: run a float checkpoint's linears in FP8 (weights per channel, activations per token) "
            "[default: from the settings; FP8 checkpoints always load in FP8]."
        ),
    ] = None,
    device: Annotated[str | None, typer.Option(help="cpu or cuda [default: from the settings].")] = None,
    max_batch_size: Annotated[int | None, typer.Option(min=1, help="Requests running at once.")] = None,
    max_seq_len: Annotated[
        int | None, typer.Option(min=2, help="Longest prompt + answer of a request.")
    ] = None,
    temperature: Annotated[
        float | None, typer.Option(min=0.0, help="Default temperature (0 = greedy).")
    ] = None,
    top_p: Annotated[float | None, typer.Option(help="Default nucleus sampling mass.")] = None,
    top_k: Annotated[int | None, typer.Option(min=0, help="Default top-k (0 = all).")] = None,
    seed: Annotated[int | None, typer.Option(min=0, help="Default sampling seed.")] = None,
    block_size: Annotated[int, typer.Option(min=1, help="KV cache tokens per block.")] = 16,
    kv_cache_tokens: Annotated[
        int | None,
        typer.Option(min=1, help="KV cache size in tokens [default: max_batch_size x max_seq_len]."),
    ] = None,
    max_step_tokens: Annotated[
        int, typer.Option(min=1, help="Tokens per model step (decodes + prompt chunks).")
    ] = 256,
    max_queue: Annotated[int, typer.Option(min=0, help="Waiting requests before answering 503.")] = 256,
    shutdown_timeout: Annotated[
        float, typer.Option(min=0.0, help="Seconds running requests get to finish on SIGTERM.")
    ] = 30.0,
) -> None:
    """Serve a model over HTTP: /v1/models, /v1/completions, /v1/chat/completions, /health, /metrics."""
    from onboardlm.registry import load_run_settings
    from onboardlm.runtime.runner import DEFAULT_MODEL_ID
    from onboardlm.runtime.serve_setup import ServeOptions, engine_for_model, load_model
    from onboardlm.serve.app import ServedModel, create_app
    from onboardlm.serve.server import bind, serve

    registry_name = model or DEFAULT_MODEL_ID
    settings = load_run_settings(
        registry_name, use_registry=use_registry, yaml_extra=yaml_extra or [], registry_dir=registry_dir
    )
    overrides = {
        "max_new_tokens": max_new_tokens,
        "dtype": dtype.value if dtype else None,
        "quantize": quantize.value if quantize else None,
        "device": device,
        "max_batch_size": max_batch_size,
        "max_seq_len": max_seq_len,
        "model_kwargs": {"num_hidden_layers": num_hidden_layers} if num_hidden_layers else None,
        "sampling": {"temperature": temperature, "top_p": top_p, "top_k": top_k, "seed": seed},
    }
    settings = settings_with_overrides(settings, overrides)
    try:
        sock = bind(host, port)
    except OSError as error:
        raise OnboardlmError(
            f"{host}:{port}", f"cannot listen there ({error.strerror})", "pick another --port"
        ) from None
    options = ServeOptions(block_size, kv_cache_tokens, max_step_tokens, max_queue)
    with console.status(f"loading and exporting {registry_name} ..."):
        started = time.perf_counter()
        loaded = load_model(model, settings)
        loaded_at = time.perf_counter()
        engine = engine_for_model(loaded.model, loaded.tokenizer, loaded.stop_ids, settings, options)
        ready_at = time.perf_counter()
    served = ServedModel.from_settings(served_model_name or registry_name, engine, settings)
    bound_host, bound_port = sock.getsockname()[:2]
    cache = engine.scheduler.allocator
    console.print(
        f"[green]serving[/] {served.name} on http://{bound_host}:{bound_port}/v1 "
        f"(KV cache {cache.num_blocks} blocks of {cache.block_size} tokens, up to {settings.max_batch_size} "
        f"requests at once, context {settings.max_seq_len}); startup: load {loaded_at - started:.1f} s, "
        f"export and warm-up {ready_at - loaded_at:.1f} s (time to first token and decode rates: /metrics)",
        highlight=False,
        soft_wrap=True,
    )
    serve(create_app(served), engine, sock, shutdown_timeout)
    console.print("[green]stopped[/]", highlight=False)
