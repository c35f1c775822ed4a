# Sourced by scripts/bench-fit.sh and scripts/bench-threads.sh: the setup both benchmarks share.
#
# Sets `here` (scripts/), `repo`, `cache`, `CARGO_TARGET_DIR`, `model` and `task` from the
# environment (HOPSCOTCH_CACHE, CARGO_TARGET_DIR, BENCH_MODEL, BENCH_TASK; defaults: the
# cache's SmolLM2-135M-Instruct and arc_easy), and defines `say` and `bench_setup`.

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
cache="${HOPSCOTCH_CACHE:-$HOME/.cache/hopscotch}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$cache/target}"
model="${BENCH_MODEL:-$cache/models/SmolLM2-135M-Instruct.Q4_1.gguf}"
task="${BENCH_TASK:-$cache/tasks/arc_easy.jsonl.gz}"

say() { printf '\n== %s\n' "$*" >&2; }

# bench_setup OUT: makes OUT, installs GNU time when missing, fetches the model and the task
# when absent, builds the release binary and sets `bin` to a copy of it in OUT, so that builds
# during the benchmark do not change the binary between runs.
bench_setup() {
    mkdir -p "$1"
    if [ ! -x /usr/bin/time ]; then
        say "installing GNU time"
        apt-get update -qq && apt-get install -y -qq time >/dev/null
    fi
    [ -f "$model" ] || "$here/fetch-model.sh"
    [ -f "$task" ] || "$here/fetch-tasks.sh"

    say "building"
    (cd "$repo" && cargo build --release --quiet)
    bin="$1/hopscotch"
    cp "$CARGO_TARGET_DIR/release/hopscotch" "$bin"
}
