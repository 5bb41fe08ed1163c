"""The test file ``onboardlm pr`` writes runs and passes in the checkout's layout, with its helper module
and ``_model_test_utils`` from the test-utils folder, and ``tensorrt_llm``'s modules standing in as thin
shims over onboardlm's (this machine has no TensorRT-LLM). Runs in a subprocess: importing the written
model file registers it with the factory."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from pr_support import run_pr

from onboardlm.pr.layout import MODEL_TESTS, TEST_UTILS

TEST = f"{MODEL_TESTS}/test_llama_modeling.py"

SHIMS = {
    "tensorrt_llm/__init__.py": "",
    "tensorrt_llm/_torch/__init__.py": "",
    "tensorrt_llm/_torch/utils.py": "from onboardlm.ops import ActivationType  # noqa: F401\n",
    "tensorrt_llm/_torch/auto_deploy/__init__.py": "",
    "tensorrt_llm/_torch/auto_deploy/custom_ops.py": "import onboardlm.ops  # noqa: F401\n",
    "tensorrt_llm/_torch/auto_deploy/export.py": "from onboardlm.export import torch_export_to_gm  # noqa: F401\n",
    "tensorrt_llm/_torch/auto_deploy/models/__init__.py": "",
    "tensorrt_llm/_torch/auto_deploy/models/hf.py": (
        "from onboardlm.models.factory import AutoModelForCausalLMFactory  # noqa: F401\n"
    ),
}


@pytest.mark.slow
def test_the_written_test_passes_in_the_checkout(onboarded: Path, checkout: Path) -> None:
    code, output = run_pr(str(onboarded), "--into", str(checkout))
    assert code == 0, output
    for path, text in SHIMS.items():
        target = checkout / path
        if not target.exists():
            target.write_text(text)
    # the skeleton's other custom models are stubs: import only the written one
    (checkout / "tensorrt_llm/_torch/auto_deploy/models/custom/__init__.py").write_text("")
    src = Path(__import__("onboardlm").__file__).parents[1]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(checkout), str(checkout / TEST_UTILS), str(src)]),
    }
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", TEST],
        cwd=checkout,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert re.search(r"\b(\d+) passed", done.stdout) and "failed" not in done.stdout
