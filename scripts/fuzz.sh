#!/usr/bin/env bash
# Fuzzes the readers with cargo-fuzz (libFuzzer): builds the targets in fuzz/, seeds each corpus
# with small valid inputs generated here, runs every target for SECONDS (default 60) and prints
# per target the executions, executions per second and crashes. A crash's input is copied to
# tests/fixtures/fuzz/<target>/, where tests/fuzz_regressions.rs replays it without the fuzzer.
#
#   scripts/fuzz.sh [SECONDS]
#
# Targets (fuzz/fuzz_targets/): gguf (GgufFile::open), checkpoint (Checkpoint::open on a folder
# with a fixed config.json and tokenizer.json and the input as model.safetensors), task
# (task::load, plain and gzip), plan (Plan::load).
#
# Needs `cargo install cargo-fuzz`. cargo fuzz passes -Z flags that only nightly rustc accepts;
# this machine has stable Rust only, so RUSTC_BOOTSTRAP=1 lets stable rustc accept them.
# FUZZ_SANITIZER (default none: libFuzzer coverage only, no AddressSanitizer; the readers are
# safe Rust apart from mmap, and the build is much cheaper) is passed to `cargo fuzz -s`; the build
# is release with debug assertions and overflow checks on (cargo fuzz's default), so an integer
# overflow is a crash too. Everything runs under `nice -n 19`. Build output: fuzz/target.
set -euo pipefail

SECS=${1:-60}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
FUZZ="$ROOT/fuzz"
SANITIZER=${FUZZ_SANITIZER:-none}
TARGETS=(gguf checkpoint task plan)
MAX_RUNS_PER_TARGET=5 # a crash stops libFuzzer; it is restarted with the time left, this often

export RUSTC_BOOTSTRAP=1
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-2}
NICE=(nice -n 19)
FUZZ_FLAGS=(-s "$SANITIZER" --fuzz-dir "$FUZZ")

cd "$ROOT"
# Resolve the fuzz crate's dependencies to the versions the main crate uses.
[[ -f "$FUZZ/Cargo.lock" ]] || cp "$ROOT/Cargo.lock" "$FUZZ/Cargo.lock"
echo "== building fuzz targets (sanitizer: $SANITIZER)"
"${NICE[@]}" cargo fuzz build "${FUZZ_FLAGS[@]}"

echo "== generating seeds in fuzz/seeds"
rm -rf "$FUZZ/seeds"
"${NICE[@]}" python3 - "$FUZZ/seeds" <<'PY'
import gzip, json, os, struct, sys

out = sys.argv[1]
def write(target, name, data):
    d = os.path.join(out, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())

# --- GGUF: hand-built v3 files (as the reader's unit tests build them).
def gstr(s):
    b = s.encode()
    return struct.pack("<Q", len(b)) + b
def gguf(kvs, tensors, data, alignment=32, version=3):
    b = b"GGUF" + struct.pack("<IQQ", version, len(tensors), len(kvs))
    for key, ty, payload in kvs:
        b += gstr(key) + struct.pack("<I", ty) + payload
    for name, dims, ty, off in tensors:
        b += gstr(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
        b += struct.pack("<IQ", ty, off)
    b += b"\0" * (-len(b) % alignment)
    return b + data
small_kvs = [
    ("general.architecture", 8, gstr("llama")),
    ("llama.block_count", 4, struct.pack("<I", 2)),
    ("tokenizer.ggml.tokens", 9, struct.pack("<IQ", 8, 2) + gstr("a") + gstr("bc")),
]
write("gguf", "small", gguf(small_kvs, [("a", [3, 2], 0, 0), ("b", [32, 1], 8, 32)],
                            b"\1" * 24 + b"\0" * 8 + b"\2" * 34))
every_type = [
    ("u8", 0, b"\7"), ("i8", 1, b"\xff"), ("u16", 2, b"\1\2"), ("i16", 3, b"\1\2"),
    ("u32", 4, b"\1\2\3\4"), ("i32", 5, b"\1\2\3\4"), ("f32", 6, struct.pack("<f", 1.5)),
    ("bool", 7, b"\1"), ("str", 8, gstr("hi")), ("u64", 10, struct.pack("<Q", 9)),
    ("i64", 11, struct.pack("<q", -9)), ("f64", 12, struct.pack("<d", 0.25)),
    ("nested", 9, struct.pack("<IQ", 9, 2) + struct.pack("<IQ", 5, 2) + struct.pack("<ii", 1, 2)
               + struct.pack("<IQ", 8, 1) + gstr("x")),
    ("general.alignment", 4, struct.pack("<I", 64)),
]
write("gguf", "every-type", gguf(every_type, [("t", [4], 0, 0), ("q", [64, 2], 2, 64)],
                                 b"\0" * 64 + b"\3" * 72, alignment=64))
write("gguf", "v2-empty", gguf([], [], b"", version=2))

# --- safetensors for the checkpoint target's fixed config (one-layer Llama, width 4, vocab 6).
def safetensors(dtype, tensors):
    size = {"F32": 4, "BF16": 2}[dtype]  # bf16: the high half of the f32
    header, data = {"__metadata__": {"format": "pt"}}, b""
    for name, shape in tensors:
        n = 1
        for d in shape:
            n *= d
        raw = b"".join(struct.pack("<f", 0.01 * i)[4 - size:] if size == 2 else struct.pack("<f", 0.01 * i)
                       for i in range(n))
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + data
llama = [("model.embed_tokens.weight", [6, 4])]
for p in ["q", "k", "v", "o"]:
    llama.append((f"model.layers.0.self_attn.{p}_proj.weight", [4, 4]))
llama += [("model.layers.0.input_layernorm.weight", [4]),
          ("model.layers.0.post_attention_layernorm.weight", [4])]
for p in ["gate", "up", "down"]:
    llama.append((f"model.layers.0.mlp.{p}_proj.weight", [4, 4]))
llama.append(("model.norm.weight", [4]))
write("checkpoint", "tiny-llama-f32", safetensors("F32", llama))
write("checkpoint", "tiny-llama-bf16", safetensors("BF16", llama))
write("checkpoint", "missing-tensor", safetensors("F32", llama[:-1]))

# --- task files, one per format, and a gzip one.
requests = "".join(json.dumps({"request": {"context": "Q: 1+1?\nA:", "continuation": c},
                               "doc_id": d, "idx": i, "label": 1, "native_id": "q1",
                               "doc": {"gold": 1}}) + "\n"
                   for d in [0, 1000000] for i, c in enumerate([" 1", " 2"]))
write("task", "requests.jsonl", requests)
write("task", "text.jsonl", '{"text": "Hello world.", "id": 7}\n{"text": "Second line."}\n')
write("task", "chat.jsonl", json.dumps({"messages": [{"role": "user", "content": "Hi"},
                                                     {"role": "assistant", "content": "Hello"}],
                                        "id": "c1"}) + "\n")
write("task", "prompts.jsonl", '\ufeff{"prompt": "Once upon a time"}\r\n\n{"prompt": "x", "id": 2}\n')
write("task", "text.jsonl.gz", gzip.compress(b'{"text": "zipped"}\n'))

# --- a valid plan for a 3-layer model.
plan = {
    "tool_version": "0.1.0",
    "model": {"architecture": "LlamaForCausalLM", "n_layer": 3, "n_embd": 4, "n_head": 1,
              "n_head_kv": 1, "n_ff": 4, "vocab_size": 6, "tensor_sha256": "ab" * 32},
    "task": {"path": "task.jsonl", "sha256": "cd" * 32, "format": "text"},
    "fit_doc_ids": ["1", "2"],
    "skipped_blocks": [2],
    "scales": {"b_att": [1.0, 0.5, 0.0], "s_att": [1.0, 1.0, 1.0], "b_mlp": [1.0, 1.0, 0.9],
               "s_mlp": [1.0, 1.0, 1.0]},
    "rounds": [{"candidates": [{"layer": 1, "screen": 0.5, "trained_loss": None},
                               {"layer": 2, "screen": None, "trained_loss": 1.25}],
                "chosen": 2, "loss": 1.25}],
    "final_loss_history": [2.0, 1.5],
    "final_loss": 1.25, "final_loss_untrained": 1.5, "attn_importance": [0.1, 0.2, 0.3],
    "settings": {"method": "hopscotch", "objective": "kl", "skip": 1, "fit_docs": 2,
                 "candidate_steps": 10, "final_steps": 20, "lr": 0.01, "final_lr": 0.005,
                 "batch_size": 2, "max_seq_len": 64, "seed": 0, "exhaustive": False,
                 "shortlist": 2, "train_scales": True, "screen": "skip-loss",
                 "screen_batches": 1, "teacher_top_k": 8},
}
write("plan", "plan.json", json.dumps(plan, indent=2))
PY

mkdir -p "$ROOT/tests/fixtures/fuzz"
SUMMARY=()
for t in "${TARGETS[@]}"; do
    mkdir -p "$FUZZ/corpus/$t" "$FUZZ/artifacts/$t" "$ROOT/tests/fixtures/fuzz/$t"
    log="$FUZZ/artifacts/$t/run.log"
    : >"$log"
    execs=0
    crashes=0
    start=$(date +%s)
    deadline=$((start + SECS))
    for ((run = 1; run <= MAX_RUNS_PER_TARGET; run++)); do
        left=$((deadline - $(date +%s)))
        ((left > 0)) || break
        before=$(find "$FUZZ/artifacts/$t" -type f ! -name run.log | wc -l)
        echo "== $t: run $run, ${left}s"
        set +e
        "${NICE[@]}" cargo fuzz run "${FUZZ_FLAGS[@]}" "$t" "$FUZZ/corpus/$t" "$FUZZ/seeds/$t" -- \
            -max_total_time="$left" -print_final_stats=1 -timeout=10 -rss_limit_mb=2048 \
            -max_len=65536 -artifact_prefix="$FUZZ/artifacts/$t/" >"$log.$run" 2>&1
        rc=$?
        set -e
        cat "$log.$run" >>"$log"
        n=$(grep -o 'stat::number_of_executed_units: [0-9]*' "$log.$run" | tail -1 | grep -o '[0-9]*$' || true)
        if [[ -z "$n" ]]; then # no final stats: take the last status line
            n=$(grep -o '^#[0-9]*' "$log.$run" | tail -1 | tr -d '#' || true)
        fi
        execs=$((execs + ${n:-0}))
        after=$(find "$FUZZ/artifacts/$t" -type f ! -name run.log | wc -l)
        if ((rc == 0)); then
            break
        fi
        if ((after > before)); then
            crashes=$((crashes + after - before))
            grep -m1 -E "panicked at|ERROR: libFuzzer|SUMMARY" "$log.$run" || true
        else
            echo "!! $t: libFuzzer exited $rc without an artifact; see $log.$run" >&2
            break
        fi
    done
    # The targets write each input to ${TMPDIR:-/tmp}/hopscotch-fuzz-<target>-<pid>/.
    rm -rf "${TMPDIR:-/tmp}/hopscotch-fuzz-$t-"*
    elapsed=$(($(date +%s) - start))
    ((elapsed > 0)) || elapsed=1
    # Every artifact (crash-, oom-, timeout-, slow-unit-...) becomes a regression input.
    for f in "$FUZZ/artifacts/$t"/*; do
        case "$(basename "$f")" in run.log*) continue ;; esac
        cp "$f" "$ROOT/tests/fixtures/fuzz/$t/"
    done
    SUMMARY+=("$(printf '%-11s %12d execs %8d execs/s %3d crashes' "$t" "$execs" $((execs / elapsed)) "$crashes")")
done

echo "== summary (${SECS}s per target; crash inputs in tests/fixtures/fuzz/<target>/)"
printf '%s\n' "${SUMMARY[@]}"
