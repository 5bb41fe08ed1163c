#!/usr/bin/env bash
# Regenerate every shipped lean model file and its generated test from the current templates, by
# onboarding each shipped model_type again into the package (the registry entry is kept).
#   scripts/regenerate_shipped.sh            # all shipped types
#   scripts/regenerate_shipped.sh llama qwen3_moe
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -eq 0 ]; then
  set -- $(ls src/onboardlm/models/custom/modeling_*.py | sed -E 's#.*/modeling_(.*)\.py#\1#')
fi
failed=()
for model_type in "$@"; do
  if onboardlm onboard "$model_type" --into-package --force > "/tmp/regenerate-$model_type.log" 2>&1; then
    echo "PASS $model_type"
  else
    echo "FAIL $model_type (log: /tmp/regenerate-$model_type.log)"; failed+=("$model_type")
  fi
done
[ ${#failed[@]} -eq 0 ] || { echo "failed: ${failed[*]}" >&2; exit 1; }
