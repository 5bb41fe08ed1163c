"""`onboardlm run --world-size 2` under torchrun (gloo, CPU) answers exactly as one process does."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig, MixtralConfig
from typer.testing import CliRunner

from onboardlm.cli import app
from onboardlm.models.source import default_model_path
from onboardlm.testing import tiny_config

ARGS = ["--prompt", "What is the capital of France?", "--prompt", "Hi", "--max-new-tokens", "12",
        "--device", "cpu", "--dtype", "float32"]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer random Llama (4 heads, 2 KV heads) with SmolLM2's tokenizer."""
    directory = tmp_path_factory.mktemp("tiny_llama_tp")
    gguf = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer.save_pretrained(directory)
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=len(tokenizer), max_position_embeddings=256, tie_word_embeddings=False,
        initializer_range=0.2,
    )  # fmt: skip
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def tiny_mixtral(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1-layer random Mixtral, saved by transformers in the hub layout (``block_sparse_moe.*.w1``)."""
    directory = tmp_path_factory.mktemp("tiny_mixtral_tp")
    gguf = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer.save_pretrained(directory)
    torch.manual_seed(0)
    config = MixtralConfig(
        hidden_size=64, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        num_local_experts=4, num_experts_per_tok=2, vocab_size=len(tokenizer), max_position_embeddings=256,
        initializer_range=0.2,
    )  # fmt: skip
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def tiny_bamba(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer random Bamba (Mamba2 layer with 2 B/C groups, then attention): conv, SSM and gated
    norm sharded, their states cached per rank."""
    directory = tmp_path_factory.mktemp("tiny_bamba_tp")
    gguf = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer.save_pretrained(directory)
    torch.manual_seed(0)
    config = tiny_config(
        AutoConfig.for_model("bamba", attn_layer_indices=[1], mamba_n_groups=2), vocab_size=len(tokenizer)
    )
    config.initializer_range = 0.2
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def tiny_mamba(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer random Mamba (Mamba1): in_proj, conv, dt_proj, A_log and D cut per inner channel,
    x_proj and out_proj rowwise, conv and scan states cached per rank."""
    directory = tmp_path_factory.mktemp("tiny_mamba_tp")
    gguf = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer.save_pretrained(directory)
    torch.manual_seed(0)
    config = tiny_config(AutoConfig.for_model("mamba"), vocab_size=len(tokenizer))
    config.initializer_range = 0.2
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    return directory


def _prompt_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("[PROMPT ")]


@pytest.mark.parametrize(
    ("fixture", "rank_local"),
    # Mixtral's hub layout needs transformers' conversion; Bamba's Mamba2 layer and Mamba's Mamba1
    # layers are sharded too
    [("tiny_model", True), ("tiny_mixtral", False), ("tiny_bamba", True), ("tiny_mamba", True)],
)
def test_two_ranks_answer_like_one_process(
    fixture: str, rank_local: bool, request: pytest.FixtureRequest, torchrun_two_ranks: list[str]
) -> None:
    tiny_model = request.getfixturevalue(fixture)
    single = CliRunner().invoke(app, ["run", "--model", str(tiny_model), *ARGS])
    assert single.exit_code == 0, single.output
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launched = subprocess.run(
        [*torchrun_two_ranks, "-m", "onboardlm.cli", "run", "--model", str(tiny_model), "--world-size", "2", *ARGS],
        capture_output=True, text=True, env=env, timeout=300, check=False,
    )  # fmt: skip
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert "tensor parallel over 2 ranks" in launched.stdout
    assert ("this rank read only its shards" in launched.stdout) == rank_local  # else the whole-model load
    lines = _prompt_lines(launched.stdout)
    assert len(lines) == 2  # rank 0 prints, rank 1 stays quiet
    assert lines == _prompt_lines(single.output)


def test_world_size_without_torchrun_says_how_to_launch(tiny_model: Path) -> None:
    result = CliRunner().invoke(app, ["run", "--model", str(tiny_model), "--world-size", "2", *ARGS])
    assert result.exit_code == 2
    assert "torchrun --nproc-per-node 2 -m onboardlm.cli run" in result.output
