"""The AutoDeploy cookbook notebook of an onboarded model (seed 002 phase 11), when the checkout has
``examples/auto_deploy/cookbooks/``.

The notebook follows the sections of TensorRT-LLM's cookbooks (introduction, environment, GPU check,
``trtllm-serve`` with the standalone registry config, the OpenAI client, a chat and a streaming
request, resources) and holds no outputs. It is written only for a model with a registry config, since
``trtllm-serve --extra_llm_api_options`` points at that file; an existing notebook is kept.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from onboardlm.pr.layout import REGISTRY, TrtllmCheckout
from onboardlm.pr.onboarded import OnboardedModel
from onboardlm.pr.registry import RegistryPlan

COOKBOOKS = Path("examples/auto_deploy/cookbooks")


@dataclass(frozen=True)
class CookbookPlan:
    note: str
    files: dict[Path, str] = field(default_factory=dict)


def cookbook_name(model_id: str) -> str:
    """``HuggingFaceTB/SmolLM2-135M-Instruct`` -> ``smollm2_135m_instruct_trtllm_cookbook.ipynb``."""
    stem = re.sub(r"[^a-z0-9.]+", "_", model_id.rsplit("/", 1)[-1].lower()).strip("_.")
    return f"{stem or 'model'}_trtllm_cookbook.ipynb"


def plan_cookbook(
    checkout: TrtllmCheckout, onboarded: OnboardedModel, registry: RegistryPlan
) -> CookbookPlan:
    folder = checkout.root / COOKBOOKS
    if not folder.is_dir():
        return CookbookPlan(f"no {COOKBOOKS} in this checkout (no cookbook)")
    if registry.name is None or registry.config is None:
        return CookbookPlan("no cookbook: it serves the model's registry config, and this PR adds none")
    path = folder / cookbook_name(registry.name)
    if path.exists():
        return CookbookPlan(f"{checkout.relative(path)} exists already (kept)")
    config = f"{REGISTRY.as_posix()}/configs/{registry.config}"
    text = json.dumps(_notebook(onboarded, registry.name, config), indent=1, ensure_ascii=False) + "\n"
    return CookbookPlan(f"added {checkout.relative(path)}", {path: text})


def _notebook(onboarded: OnboardedModel, model_id: str, config: str) -> dict[str, Any]:
    short = model_id.rsplit("/", 1)[-1]
    fit = onboarded.report.get("fit") or {}
    bf16 = (fit.get("bytes_per_dtype") or {}).get("bfloat16")
    vram = f" (the BF16 weights alone take {bf16 / 2**30:.1f} GiB)" if isinstance(bf16, int) else ""
    gpus = fit.get("world_size") or 1
    cells = [
        _markdown(
            f"# Deploying {short} with TensorRT-LLM\n\n"
            f"This notebook walks you through deploying the `{model_id}` model using TensorRT-LLM.\n\n"
            "[TensorRT-LLM](https://nvidia.github.io/TensorRT-LLM/) is NVIDIA's open-source library for "
            f"accelerating LLM inference on NVIDIA GPUs. Support for {short} (`{onboarded.causal_lm_class}`) "
            "is enabled through the [AutoDeploy](https://nvidia.github.io/TensorRT-LLM/torch/auto_deploy/"
            "auto-deploy.html) workflow.\n\n"
            f"**Model Resources:**\n- [HuggingFace Model Card](https://huggingface.co/{model_id})\n\n"
            f"**Prerequisites:**\n- {gpus} NVIDIA GPU(s) with recent drivers{vram} and CUDA 12.x\n"
            "- Python 3.10+\n- TensorRT-LLM ([container](https://catalog.ngc.nvidia.com/orgs/nvidia/teams/"
            "tensorrt-llm/containers/release) or pip install)"
        ),
        _markdown(
            "## Prerequisites & Environment\n\nRun TensorRT-LLM's release container in a terminal:\n\n"
            "```shell\ndocker run --rm -it --ipc=host --ulimit memlock=-1 --ulimit stack=67108864 --gpus=all "
            "-p 8000:8000 nvcr.io/nvidia/tensorrt-llm/release\n```"
        ),
        _code("%pip install torch openai"),
        _markdown("## Verify GPU\n\nCheck that CUDA is available and the GPU is detected correctly."),
        _code(
            "import sys\n\nimport torch\n\n"
            'print(f"Python: {sys.version}")\nprint(f"CUDA available: {torch.cuda.is_available()}")\n'
            'print(f"Num GPUs: {torch.cuda.device_count()}")\n'
            "for i in range(torch.cuda.device_count()):\n"
            '    print(f"GPU[{i}]: {torch.cuda.get_device_name(i)}")'
        ),
        _markdown(
            "## OpenAI-Compatible Server\n\nStart the server in the container's terminal, with the "
            f"standalone AutoDeploy config `{config}`:\n\n"
            f'```shell\ntrtllm-serve "{model_id}" \\\n  --host 0.0.0.0 \\\n  --port 8000 \\\n'
            f"  --backend _autodeploy \\\n  --extra_llm_api_options {config}\n```"
        ),
        _markdown("## Use the API\n\nSend requests to the server with the OpenAI client."),
        _code(
            "from openai import OpenAI\n\n"
            'client = OpenAI(base_url="http://0.0.0.0:8000/v1", api_key="null")\n'
            f'MODEL_ID = "{model_id}"'
        ),
        _code(
            "response = client.chat.completions.create(\n    model=MODEL_ID,\n"
            '    messages=[{"role": "user", "content": "Where is the capital of Iceland?"}],\n'
            "    temperature=0,\n    max_tokens=128,\n)\nprint(response.choices[0].message.content)"
        ),
        _code(
            "stream = client.chat.completions.create(\n    model=MODEL_ID,\n"
            '    messages=[{"role": "user", "content": "What are the first 5 prime numbers?"}],\n'
            "    max_tokens=256,\n    stream=True,\n)\nfor chunk in stream:\n"
            "    if chunk.choices[0].delta.content:\n"
            '        print(chunk.choices[0].delta.content, end="", flush=True)'
        ),
        _markdown(
            "## Additional Resources\n\n- [TensorRT-LLM Documentation](https://nvidia.github.io/TensorRT-LLM/)\n"
            "- [AutoDeploy Guide](https://nvidia.github.io/TensorRT-LLM/torch/auto_deploy/auto-deploy.html)\n"
            f"- [{short} on HuggingFace](https://huggingface.co/{model_id})"
        ),
    ]
    return {
        "cells": cells,
        "metadata": {
            "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
            "language_info": {"name": "python"},
        },
        "nbformat": 4,
        "nbformat_minor": 4,
    }


def _lines(text: str) -> list[str]:
    return text.splitlines(keepends=True)


def _markdown(text: str) -> dict[str, Any]:
    return {"cell_type": "markdown", "metadata": {}, "source": _lines(text)}


def _code(text: str) -> dict[str, Any]:
    return {
        "cell_type": "code",
        "execution_count": None,
        "metadata": {},
        "outputs": [],
        "source": _lines(text),
    }
