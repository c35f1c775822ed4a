#!/usr/bin/env bash
# The test command: installs build needs, fetches the real model and data, runs every test.
# The build lives outside the clone (CARGO_TARGET_DIR) so later runs reuse the vendored
# llama.cpp build.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
"$here/setup.sh"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/hopscotch/target}"
cd "$here/.."
cargo test --release "$@"
