#!/usr/bin/env bash
# The fit on an NVIDIA GPU, checked in one command on a machine with a GPU, Rust and a network:
#
#   1. builds hopscotch with --features cuda for this GPU's compute capability (nvcc from PATH,
#      CUDA_HOME, or the PyPI wheels scripts/check-cuda.sh installs into the cache);
#   2. the parity test: the tiny model's logits and scalar gradients on the GPU against the CPU,
#      with a shared prefix, a skipped block and recomputation, within 1e-3 of the largest value
#      (src/model/tests.rs, `the_gpu_gives_the_cpus_logits_and_gradients`);
#   3. fits SmolLM2-135M-Instruct on arc_easy (K=4, default settings) on the GPU and on the CPU
#      (CUDA_VISIBLE_DEVICES empty) and prints both plans' blocks, then says whether they match;
#   4. when the 8B-shaped folder of scripts/bench-scale.sh is in the cache (BENCH_ONLY=8b writes
#      it), times a whole K=4 search on it on the GPU and prints the time per training step.
#
# Each step prints its wall time; the figures to report are the ones it prints. Usage:
# scripts/check-gpu.sh. Env: HOPSCOTCH_CACHE (default ~/.cache/hopscotch); CARGO_TARGET_DIR
# (default $HOPSCOTCH_CACHE/target-cuda); OUT (default a temporary folder) for the plans.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cache="${HOPSCOTCH_CACHE:-$HOME/.cache/hopscotch}"
out="${OUT:-$(mktemp -d)}"
mkdir -p "$out"
say() { printf '\n== check-gpu: %s\n' "$*" >&2; }
timed() { # NAME CMD...: runs CMD, printing its wall time
    local name="$1" start=$SECONDS
    shift
    say "$name"
    "$@"
    say "$name: $((SECONDS - start)) s"
}

command -v nvidia-smi >/dev/null 2>&1 || { echo "check-gpu: no nvidia-smi: this needs an NVIDIA GPU" >&2; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv,noheader >&2
command -v cargo >/dev/null 2>&1 || { echo "check-gpu: cargo is missing (install Rust with rustup)" >&2; exit 1; }

if ! command -v nvcc >/dev/null 2>&1; then
    if [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/nvcc" ]; then
        export PATH="$CUDA_HOME/bin:$PATH"
    else
        # the wheels scripts/check-cuda.sh installs (its `check` step also compiles the library)
        "$here/check-cuda.sh" check
        export CUDA_HOME="$cache/cuda/cu13.4/nvidia/cu13"
        export PATH="$CUDA_HOME/bin:$PATH"
    fi
fi
cap="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -n 1 | tr -d '.')"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-$cap}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$cache/target-cuda}"
cd "$here/.."

timed "build (--features cuda, sm_$CUDA_COMPUTE_CAP)" cargo build --release --features cuda --quiet
bin="$CARGO_TARGET_DIR/release/hopscotch"

timed "parity: tiny model on the GPU against the CPU" \
    cargo test --release --features cuda --lib the_gpu_gives_the_cpus_logits_and_gradients \
    -- --ignored --nocapture

model="$("$here/fetch-model.sh")"
task="$("$here/fetch-tasks.sh")/arc_easy.jsonl.gz"
blocks() { python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["skipped_blocks"])' "$1"; }
timed "SmolLM2 K=4 on the GPU" "$bin" fit "$model" --task "$task" --skip 4 --force \
    -o "$out/smollm2-gpu.json"
timed "SmolLM2 K=4 on the CPU" env CUDA_VISIBLE_DEVICES= "$bin" fit "$model" --task "$task" \
    --skip 4 --force -o "$out/smollm2-cpu.json"
gpu="$(blocks "$out/smollm2-gpu.json")"
cpu="$(blocks "$out/smollm2-cpu.json")"
say "SmolLM2 blocks: GPU $gpu, CPU $cpu ($([ "$gpu" = "$cpu" ] && echo same || echo DIFFERENT))"

synth8b="$cache/bench/synth-llama-3.1-8b"
if [ -f "$synth8b/.ready" ]; then
    timed "8B shape: a whole K=4 search and final training on the GPU" "$bin" fit "$synth8b" \
        --task "$task" --skip 4 --force --json -o "$out/8b-gpu.json" >"$out/8b-gpu.report.json"
    python3 - "$out/8b-gpu.report.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
t, s = r["train"], r["seconds"]
print(f"8B shape on the GPU: search {s['search']:.1f} s, final training {s['final_training']:.1f} s, "
      f"{t['steps']} training steps in {t['seconds']:.1f} s ({t['seconds'] / max(t['steps'], 1):.2f} s per step)")
PY
else
    say "8B shape: skipped ($synth8b is missing: BENCH_ONLY=8b scripts/bench-scale.sh writes it)"
fi
