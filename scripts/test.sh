#!/usr/bin/env bash
# The test command: installs build needs, fetches the real model and data, runs every test and
# closes with the totals. The build lives outside the clone (CARGO_TARGET_DIR) so later runs
# reuse the vendored llama.cpp build.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
"$here/setup.sh"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/hopscotch/target}"
cd "$here/.."
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
status=0
cargo test --release "$@" 2>&1 | tee "$log" || status=$?
passed=$(grep -Eo '^test result: .* ([0-9]+) passed' "$log" | grep -Eo '[0-9]+ passed' | awk '{s+=$1} END {print s+0}')
failed=$(grep -Eo '[0-9]+ failed;' "$log" | awk '{s+=$1} END {print s+0}')
echo "tests: $passed passed, $failed failed"
exit $status
