"""A skeleton TensorRT-LLM checkout and an onboarding output of the shipped Llama, to try or test
``onboardlm pr`` without TensorRT-LLM: the files and folders ``onboardlm pr`` reads and writes, committed
on ``main`` of a fresh git repository, and a passing onboarding's output folder as the pipeline writes it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from transformers import LlamaConfig

import onboardlm.models.custom
from onboardlm.onboard.fit import FitReport
from onboardlm.onboard.phases import PhaseRecord
from onboardlm.onboard.report import write_report
from onboardlm.onboard.result import OnboardResult, PromptRecord, TestRecord
from onboardlm.review import review_model_file

MODELS_YAML = """\
version: '2.0'
description: AutoDeploy Model Registry - Flat format with composable configs
models:
- name: TinyLlama/TinyLlama-1.1B-Chat-v1.0
  config_id: default_ws_1
  yaml_extra: ['dashboard_default.yaml', 'world_size_1.yaml']
# OOM during AutoDeploy run.
# - name: meta-llama/Meta-Llama-3-70B-Instruct
#   config_id: default_ws_4
#   yaml_extra: ['dashboard_default.yaml', 'world_size_4.yaml']
- name: Qwen/Qwen3-0.6B
  config_id: default_ws_1
  yaml_extra: ['dashboard_default.yaml', 'world_size_1.yaml']
"""

CUSTOM_INIT = """\
from .modeling_cohere import CohereForCausalLM
from .modeling_mistral import MistralForCausalLM

__all__ = (
    "CohereForCausalLM",
    "MistralForCausalLM",
)
"""

MODEL_TEST_UTILS = """\
import torch


def assert_rmse_close(actual, expected, rmse_ratio_tol, msg=""):
    ratio = (torch.linalg.vector_norm(actual.float() - expected.float()) / torch.linalg.vector_norm(expected.float())).item()
    assert ratio < rmse_ratio_tol, f"{msg}RMSE ratio {ratio:.6f} exceeds tolerance {rmse_ratio_tol}"
"""

SUPPORTED_MODELS = """\
(support-matrix)=
# Supported Models

The following is a table of supported models for the PyTorch backend:

| Architecture                         | Model                              | HuggingFace Example                          |
| ------------------------------------ | ---------------------------------- | -------------------------------------------- |
| `Cohere2ForCausalLM`                 | Command A                          | `CohereLabs/c4ai-command-a-03-2025`          |
| `MistralForCausalLM`                 | Mistral                            | `mistralai/Mistral-7B-v0.1`                  |

[^5]: Supported via the [AutoDeploy](../features/auto_deploy/auto-deploy.md) backend. See [AD Configs](../../../examples/auto_deploy/model_registry/configs).
"""

FILES = {
    "examples/auto_deploy/cookbooks/README.md": "# AutoDeploy cookbooks\n",
    "docs/source/models/supported-models.md": SUPPORTED_MODELS,
    "tensorrt_llm/_torch/auto_deploy/models/custom/__init__.py": CUSTOM_INIT,
    "tensorrt_llm/_torch/auto_deploy/models/custom/modeling_cohere.py": "class CohereForCausalLM: ...\n",
    "tensorrt_llm/_torch/auto_deploy/models/custom/modeling_mistral.py": "class MistralForCausalLM: ...\n",
    "tests/unittest/_torch/auto_deploy/unit/singlegpu/models/test_cohere_modeling.py": "def test_x(): ...\n",
    "tests/unittest/_torch/auto_deploy/_utils_test/_model_test_utils.py": MODEL_TEST_UTILS,
    "examples/auto_deploy/model_registry/models.yaml": MODELS_YAML,
    "examples/auto_deploy/model_registry/configs/dashboard_default.yaml": (
        "# Default configuration for all AutoDeploy dashboard tests\nruntime: trtllm\n"
        "compile_backend: torch-cudagraph\nmax_seq_len: 512\nmax_batch_size: 8\n"
        "cuda_graph_config:\n  max_batch_size: 8\n"
    ),
    "examples/auto_deploy/model_registry/configs/world_size_1.yaml": "world_size: 1\n",
    "examples/auto_deploy/model_registry/configs/world_size_2.yaml": "world_size: 2\n",
}

GIT_ENV = {
    "GIT_AUTHOR_NAME": "Test Author",
    "GIT_AUTHOR_EMAIL": "author@example.com",
    "GIT_COMMITTER_NAME": "Test Author",
    "GIT_COMMITTER_EMAIL": "author@example.com",
    "GIT_CONFIG_GLOBAL": os.devnull,
    "GIT_CONFIG_NOSYSTEM": "1",
}


def git(root: Path, *args: str) -> str:
    """``git -C root ARGS`` with :data:`GIT_ENV` (a fixed identity, no user or system config)."""
    done = subprocess.run(
        ["git", "-C", str(root), *args],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, **GIT_ENV},
    )
    return done.stdout.strip()


def make_checkout(root: Path) -> Path:
    """Write the skeleton under ``root`` and commit it on ``main``."""
    for path, text in FILES.items():
        target = root / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    git(root, "init", "--quiet", "--initial-branch=main")
    git(root, "add", "-A")
    git(root, "commit", "--quiet", "-m", "skeleton")
    return root


HUB_ID = "meta-llama/Llama-3.2-1B-Instruct"
PROMPTS = [
    PromptRecord(0, "How big is the universe?", "garbled reduced output", "reduced (2 layers)"),
    PromptRecord(0, "How big is the universe?", "The observable universe is about 93 billion light-years across.", "full"),
    PromptRecord(1, "Where is the capital of Iceland?", "Reykjavik | is the capital: of Iceland.", "full"),
]  # fmt: skip
TESTS = [
    TestRecord("block", "test_block_llama_attention[model.layers.0.self_attn]", 1.2e-07, 1e-05, True),
    TestRecord("layer", "test_layer_llama_decoder_layer[layers.0]", 2.96e-07, 1e-05, True),
    TestRecord("model", "test_model_logits_fp32", 5.02e-07, 1e-05, True),
    TestRecord("export", "test_export_dynamic_batch_and_sequence", 0.0, None, True),
]


def write_onboarding(out: Path, test_text: str | None = None, status: str = "pass") -> Path:
    """A passing onboarding's output folder (``status="fail"``: one whose verify failed) as the pipeline
    writes it: the shipped lean Llama, its generated test (``test_text``, else generated now), a real
    review and a report.json of :data:`TESTS` and :data:`PROMPTS`, registered as :data:`HUB_ID`."""
    out.mkdir(parents=True)
    model = out / "modeling_llama.py"
    test = out / "test_llama_modeling.py"
    shutil.copy(Path(onboardlm.models.custom.__file__).parent / "modeling_llama.py", model)
    if test_text is None:
        from onboardlm.onboard.testgen import generate_test_file

        test_text = generate_test_file(
            LlamaConfig(), "modeling_llama", "llama", lean_source=model.read_text()
        )
    test.write_text(test_text)
    phases = [
        PhaseRecord(name, "pass" if name != "verify" or status == "pass" else "fail", 0.1, "ok")
        for name in ("resolve", "fit", "generate", "testgen", "verify", "review", "register", "e2e")
    ]
    result = OnboardResult(
        model=HUB_ID,
        model_type="llama",
        out_dir=out,
        phases=phases,
        files=[model, test],
        tests=list(TESTS),
        prompts=list(PROMPTS),
        fit=FitReport(1_235_814_400, {"bfloat16": 2_471_628_800}, 1),
        review=review_model_file(model, test, config=LlamaConfig()),
        seconds=33.4,
        registered_as=HUB_ID,
    )
    write_report(result, out)
    return out
