#!/usr/bin/env bash
# The main job on the bundled real model: installs build needs, fetches SmolLM2-135M-Instruct
# and ARC-Easy, builds hopscotch, and runs the whole pipeline: fit a plan that skips K attention
# blocks, export the slim GGUF (deci, attention-free layers) at q4_k_m, and evaluate it against
# the original at q4_k_m in llama.cpp on held-out documents. Results land in $OUT (default
# ./hopscotch-demo): plan.json, slim.gguf, slim.Modelfile, original.gguf, report.md/json/svg.
# K, TASK, LIMIT and TYPE can be set in the environment.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
"$here/setup.sh"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/hopscotch/target}"
(cd "$here/.." && cargo build --release)
cache="${HOPSCOTCH_CACHE:-$HOME/.cache/hopscotch}"
model="$("$here/fetch-model.sh")"
task="$("$here/fetch-tasks.sh")/${TASK:-arc_easy}.jsonl.gz"
out="${OUT:-hopscotch-demo}"
"$CARGO_TARGET_DIR/release/hopscotch" run "$model" --task "$task" --skip "${K:-4}" \
    --type "${TYPE:-q4_k_m}" --limit "${LIMIT:-300}" -o "$out" --force
echo "report: $out/report.md"
