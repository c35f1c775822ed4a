#!/usr/bin/env bash
# Benchmark (not a test): `hopscotch fit` on the real SmolLM2-135M-Instruct and a real task at
# 1 thread and at N threads, the same settings otherwise. Prints each run's wall time, CPU
# seconds (user + system), peak RSS (/usr/bin/time) and phase times, and whether the two plans
# are byte for byte the same (they should be: the fit combines its parallel pieces in order).
#
# Usage: scripts/bench-threads.sh
# Env:   HOPSCOTCH_CACHE   cache root (default ~/.cache/hopscotch)
#        CARGO_TARGET_DIR  where the release binary is built (default $HOPSCOTCH_CACHE/target)
#        BENCH_MODEL       model (default $HOPSCOTCH_CACHE/models/SmolLM2-135M-Instruct.Q4_1.gguf)
#        BENCH_TASK        task (default $HOPSCOTCH_CACHE/tasks/arc_easy.jsonl.gz)
#        BENCH_THREADS     N (default: all cores)
#        BENCH_ARGS        fit settings (default "--skip 1 --fit-docs 32 --final-docs 32 --final-steps 4")
#        BENCH_OUT         folder for plans and logs (default $HOPSCOTCH_CACHE/bench/threads)
#
# Run it with nothing else on the machine: other jobs change wall times.
set -euo pipefail

# shellcheck source=scripts/bench-lib.sh
source "$(dirname "$0")/bench-lib.sh"
threads="${BENCH_THREADS:-$(nproc)}"
read -r -a args <<< "${BENCH_ARGS:---skip 1 --fit-docs 32 --final-docs 32 --final-steps 4}"
out="${BENCH_OUT:-$cache/bench/threads}"
bench_setup "$out"

for t in 1 "$threads"; do
    say "$t thread(s): fit $model --task $task ${args[*]} --threads $t"
    /usr/bin/time -f "%e %U %S %M" -o "$out/t$t.time" \
        "$bin" fit "$model" --task "$task" "${args[@]}" --threads "$t" --force --json \
        -o "$out/t$t.json" > "$out/t$t.report.json" 2> "$out/t$t.log"
done

python3 - "$out" 1 "$threads" <<'PY'
import json, sys
out, runs = sys.argv[1], sys.argv[2:]
rows = []
for t in runs:
    wall, user, sys_, rss = open(f"{out}/t{t}.time").read().split()[-4:]
    r = json.load(open(f"{out}/t{t}.report.json"))
    s = r["seconds"]
    rows.append((t, float(wall), float(user) + float(sys_), int(rss) / 1e6, s))
    print(f"threads {t:>3}: wall {float(wall):7.1f} s, CPU {float(user) + float(sys_):7.1f} s, "
          f"peak RSS {int(rss) / 1e6:5.2f} GB; prepare {s['prepare']:.1f} s, search {s['search']:.1f} s, "
          f"final {s['final_training']:.1f} s")
if len(rows) == 2:
    print(f"speed-up at {rows[1][0]} threads: {rows[0][1] / rows[1][1]:.2f}x wall")
same = open(f"{out}/t{runs[0]}.json", "rb").read() == open(f"{out}/t{runs[-1]}.json", "rb").read()
print("plans byte for byte the same:", same)
PY
