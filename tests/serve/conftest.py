"""Live servers on 127.0.0.1 for the serve tests: SmolLM2 from the shipped GGUF, and a tiny random Llama
(SmolLM2's tokenizer, 2 layers of width 32) saved in a temporary directory, both loaded through
``load_engine`` as ``onboardlm serve`` loads them."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from onboardlm.registry.settings import RunSettings
from onboardlm.runtime.engine import build_cached_graph
from onboardlm.runtime.runner import DEFAULT_MODEL_ID, Runner
from onboardlm.runtime.serve_setup import LoadedModel, ServeOptions, engine_for_model, load_engine, load_model
from onboardlm.serve.app import ServedModel, create_app
from onboardlm.serve.server import BackgroundServer
from onboardlm.testing.checkpoints import save_tiny_llama

SMOLLM2 = "smollm2"
TINY = "tiny"
#: The settings ``onboardlm run`` uses in the equality tests, on the CPU in fp32.
SMOLLM2_SETTINGS = RunSettings(
    dtype="float32", device="cpu", max_batch_size=32, max_seq_len=512, max_new_tokens=32
)
TINY_SETTINGS = RunSettings(
    dtype="float32", device="cpu", max_batch_size=32, max_seq_len=512, max_new_tokens=8
)


def start(model: str | None, name: str, settings: RunSettings, options: ServeOptions) -> BackgroundServer:
    engine = load_engine(model, settings, options)
    return BackgroundServer(create_app(ServedModel.from_settings(name, engine, settings)), engine)


def client(server: BackgroundServer, **kwargs) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, **kwargs)


@pytest.fixture(scope="session")
def smollm2() -> LoadedModel:
    """SmolLM2 loaded once (dequantising the GGUF is the slow part) for the server and the runner."""
    return load_model(None, SMOLLM2_SETTINGS)


@pytest.fixture(scope="session")
def smollm2_server(smollm2: LoadedModel) -> Iterator[BackgroundServer]:
    options = ServeOptions(block_size=16, max_step_tokens=256)
    engine = engine_for_model(smollm2.model, smollm2.tokenizer, smollm2.stop_ids, SMOLLM2_SETTINGS, options)
    served = ServedModel.from_settings(SMOLLM2, engine, SMOLLM2_SETTINGS)
    with BackgroundServer(create_app(served), engine) as server:
        yield server


@pytest.fixture(scope="session")
def smollm2_runner(smollm2: LoadedModel) -> Runner:
    """``onboardlm run``'s runner over the same weights (what ``Runner.load(None, settings)`` builds)."""
    settings = SMOLLM2_SETTINGS.model_copy(update={"max_batch_size": 8})
    graph = build_cached_graph(smollm2.model)
    return Runner(
        DEFAULT_MODEL_ID, settings, smollm2.config, smollm2.tokenizer, graph, smollm2.report,
        next(smollm2.model.parameters()).device, smollm2.stop_ids,
    )  # fmt: skip


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_server(tiny_model: Path) -> Iterator[BackgroundServer]:
    options = ServeOptions(block_size=8, max_step_tokens=128, max_waiting=1024)
    with start(str(tiny_model), TINY, TINY_SETTINGS, options) as server:
        yield server
