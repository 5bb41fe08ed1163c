#!/usr/bin/env bash
# Regenerate constraints.txt: every direct, test and transitive dependency at one exact version,
# resolved by uv for Python 3.11 on Linux x86_64 from the package index. setup.sh, .ci/run and
# scripts/compat.sh install through it, so two installs on different days get the same environment.
# torch is pinned without its local label (2.13.0, not 2.13.0+cpu) so that the CPU build and the CUDA
# build both satisfy it; the CPU build's dependency set is the one locked.
set -euo pipefail
cd "$(dirname "$0")/.."
UV_VERSION=0.13.9
tools=$(mktemp -d)
trap 'rm -rf "$tools"' EXIT
python3 -m venv "$tools/venv"
"$tools/venv/bin/pip" install --quiet --disable-pip-version-check "uv==$UV_VERSION"
find_links=()
[ -d /opt/wheels ] && find_links=(--find-links /opt/wheels)
echo "torch==2.13.0+cpu" > "$tools/torch.txt"
# The build backend too (pyproject's build-system), so the isolated builds are pinned as well.
echo "setuptools>=68" > "$tools/build.txt"
"$tools/venv/bin/uv" pip compile pyproject.toml "$tools/build.txt" --extra test \
  --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
  "${find_links[@]}" --constraints "$tools/torch.txt" \
  --no-header --no-annotate --quiet --output-file "$tools/out.txt"
{
  echo "# Exact versions of every dependency: pyproject.toml's ranges, its 'test' extra and the build backend."
  echo "# Regenerate with: scripts/lock.sh   (uv $UV_VERSION, Python 3.11, Linux x86_64)"
  sed -E 's/^(torch==[^+ ]+)\+cpu/\1/' "$tools/out.txt"
} > constraints.txt
echo "wrote constraints.txt ($(grep -c '==' constraints.txt) pins)"
