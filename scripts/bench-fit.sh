#!/usr/bin/env bash
# Benchmark (not a test): `hopscotch fit --exhaustive` (the paper's loop: every candidate trained
# every round) against the default screened search, on the real SmolLM2-135M-Instruct with a
# real task, same settings for both. Reports wall time and peak RSS (/usr/bin/time -v), the
# blocks each chooses, the final loss of each, the training step's tokens/s, and how well the
# screening ranks the candidates compared with the exhaustive trained scores (Spearman
# rank correlation per round, and whether the exhaustive winner made the shortlist), for the
# rounds where the screened run had chosen the same blocks so far.
#
# The exhaustive loop trains (L-1) + (L-2) + ... candidates: at full settings it takes hours on
# two cores, so the defaults below are small; the comparison always uses one setting for all runs.
#
# Usage: scripts/bench-fit.sh
# Env:   HOPSCOTCH_CACHE   cache root (default ~/.cache/hopscotch)
#        CARGO_TARGET_DIR  where the release binary is built (default $HOPSCOTCH_CACHE/target)
#        BENCH_MODEL       model (default $HOPSCOTCH_CACHE/models/SmolLM2-135M-Instruct.Q4_1.gguf)
#        BENCH_TASK        task (default $HOPSCOTCH_CACHE/tasks/arc_easy.jsonl.gz)
#        BENCH_SKIP        blocks to skip (default 4)
#        BENCH_FIT_DOCS    documents (default 12)
#        BENCH_BATCH       batch size (default 4)
#        BENCH_SEQ         max sequence length (default 64)
#        BENCH_THREADS     threads (default 1)
#        BENCH_EXTRA       further arguments for every run (e.g. "--final-steps 8")
#        BENCH_OUT         folder for plans and logs (default $HOPSCOTCH_CACHE/bench/fit)
#        BENCH_SUMMARY_ONLY=1  only print the summary of the runs already in BENCH_OUT
#
# Other jobs on the machine change the step time from run to run, so besides the wall-clock
# speed-up the summary gives two at equal load: the CPU seconds (user + system) of each run, which
# other jobs barely change with one thread, and the exhaustive run's steps (plus its untimed
# rest) at the screened run's own seconds per step, against the screened run's wall time.
set -euo pipefail

# shellcheck source=scripts/bench-lib.sh
source "$(dirname "$0")/bench-lib.sh"
skip="${BENCH_SKIP:-4}"
docs="${BENCH_FIT_DOCS:-12}"
batch="${BENCH_BATCH:-4}"
seq="${BENCH_SEQ:-64}"
threads="${BENCH_THREADS:-1}"
extra="${BENCH_EXTRA:-}"
out="${BENCH_OUT:-$cache/bench/fit}"
bench_setup "$out"

common=(--task "$task" --skip "$skip" --fit-docs "$docs" --batch-size "$batch"
    --max-seq-len "$seq" --threads "$threads" --force --json)
# shellcheck disable=SC2206
common+=($extra)

run() { # name, extra args...
    local name="$1"
    shift
    say "$name: $bin fit $model ${common[*]} $* -o $out/$name.json"
    /usr/bin/time -v -o "$out/$name.time" "$bin" fit "$model" "${common[@]}" "$@" \
        -o "$out/$name.json" >"$out/$name.summary.json" 2>"$out/$name.log"
}

if [ -z "${BENCH_SUMMARY_ONLY:-}" ]; then
    run exhaustive --exhaustive
    run screened
    run screened-every --rescreen 0
fi

say "summary"
python3 - "$out" exhaustive screened screened-every <<'EOF'
import json, re, sys

out, names = sys.argv[1], sys.argv[2:]

def time_v(name):
    text = open(f"{out}/{name}.time").read()
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", text).group(1)
    secs = 0.0
    for part in wall.split(":"):
        secs = secs * 60 + float(part)
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", text).group(1))
    cpu = sum(float(re.search(rf"{k} time \(seconds\): (\S+)", text).group(1)) for k in ("User", "System"))
    return secs, rss / 1024, cpu

def ranks(xs):
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    r = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for k in range(i, j + 1):
            r[order[k]] = (i + j) / 2
        i = j + 1
    return r

def spearman(a, b):
    ra, rb = ranks(a), ranks(b)
    n = len(a)
    ma, mb = sum(ra) / n, sum(rb) / n
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va = sum((x - ma) ** 2 for x in ra) ** 0.5
    vb = sum((y - mb) ** 2 for y in rb) ** 0.5
    return cov / (va * vb) if va and vb else float("nan")

plans = {n: json.load(open(f"{out}/{n}.json")) for n in names}
summaries = {n: json.load(open(f"{out}/{n}.summary.json")) for n in names}
base = plans["exhaustive"]
base_wall, _, base_cpu = time_v("exhaustive")
print(f"settings: {json.dumps({k: base['settings'][k] for k in ('skip', 'fit_docs', 'batch_size', 'max_seq_len', 'candidate_steps', 'final_steps', 'lr', 'final_lr', 'objective')})}")
base_train = summaries["exhaustive"]["train"]
base_rest = base_wall - base_train["seconds"]
print(f"{'run':<22} {'wall s':>7} {'speed-up':>8} {'at eq. load':>11} {'cpu s':>6} {'by cpu':>6} {'steps':>5} {'screened':>8} "
      f"{'peak MiB':>8} {'tok/s':>5} {'final loss':>10} {'vs exh.':>7}  blocks")
for n in names:
    wall, rss, cpu = time_v(n)
    p, s = plans[n], summaries[n]
    t = s["train"]
    per_step = t["seconds"] / t["steps"] if t["steps"] else float("nan")
    equal = (base_train["steps"] * per_step + base_rest) / wall
    rel = (p["final_loss"] - base["final_loss"]) / base["final_loss"] * 100 if base["final_loss"] else float("nan")
    print(f"{n:<22} {wall:>7.0f} {base_wall / wall:>7.1f}x {equal:>10.1f}x {cpu:>6.0f} {base_cpu / cpu:>5.1f}x {t['steps']:>5} {t['screened']:>8} "
          f"{rss:>8.0f} {s['train_tokens_per_s']:>5.0f} {p['final_loss']:>10.4f} {rel:>+6.1f}%  {p['skipped_blocks']}"
          f"{'  (same as exhaustive)' if p['skipped_blocks'] == base['skipped_blocks'] else ''}")

print("\nrank of each round's shortlisted candidates in the latest screening before the round (what --rescreen keeps):")
for n in names[1:]:
    rounds = plans[n]["rounds"]
    worst = []
    for r in range(1, len(rounds)):
        chosen = set(plans[n]["skipped_blocks"][:r])
        short = [c["layer"] for c in rounds[r]["candidates"] if c.get("trained_loss") is not None]
        prev = sorted((c for c in rounds[r - 1]["candidates"] if c.get("screen") is not None and c["layer"] not in chosen),
                      key=lambda c: (c["screen"], c["layer"]))
        order = [c["layer"] for c in prev]
        worst.append(max(order.index(l) + 1 if l in order else 99 for l in short))
    print(f"  {n:<22} rescreen {plans[n]['settings'].get('rescreen', 0)}: worst rank per round {worst}")

print("\nscreening vs exhaustive trained scores (rounds with the same blocks chosen before):")
for n in names[1:]:
    p = plans[n]
    for r, (er, sr) in enumerate(zip(base["rounds"], p["rounds"])):
        if base["skipped_blocks"][:r] != p["skipped_blocks"][:r]:
            break
        trained = {c["layer"]: c["trained_loss"] for c in er["candidates"]}
        screen = {c["layer"]: c["screen"] for c in sr["candidates"]}
        layers = sorted(trained)
        if any(screen.get(l) is None for l in layers):
            continue
        rho = spearman([screen[l] for l in layers], [trained[l] for l in layers])
        order = sorted(layers, key=lambda l: (screen[l], l))
        pos = order.index(er["chosen"]) + 1
        top5 = sorted(layers, key=lambda l: (trained[l], l))[:5]
        print(f"  {n:<22} round {r + 1}: spearman {rho:+.3f}; exhaustive winner {er['chosen']} "
              f"ranked {pos} of {len(layers)} by the screen; exhaustive top 5 {top5}, screen top 5 {order[:5]}")
EOF
