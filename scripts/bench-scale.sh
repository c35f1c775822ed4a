#!/usr/bin/env bash
# Benchmark (not a test): the fit at the sizes people slim. Writes random-weight Hugging Face
# folders shaped like Llama-3.2-1B and Llama-3.1-8B (bf16, SmolLM2's tokenizer so that a real
# task tokenizes: vocabulary 49,152) and their q4_k_m GGUFs into the cache, then runs under
# /usr/bin/time and prints wall time, CPU time, peak RSS and the exit status of:
#
#   smollm2      hopscotch run --skip 4 on SmolLM2-135M-Instruct (the fixed-K run of the README)
#   1b           hopscotch run --skip 4, default settings, --limit 300, on the 1B folder
#   1b-q4        the same from the 1B q4_k_m GGUF
#   8b           a minimal fit on the 8B folder: --skip 1, one batch of 8 fit documents, every
#                candidate screened, the best one trained one step, one final step
#   8b-q4        the same from the 8B q4_k_m GGUF
#
# A fit that the machine cannot hold stops at once with its memory estimate (exit status 1);
# the table says so. On 2 cores the 1B run and each 8B fit take tens of minutes; the folders take
# ~19 GB of disk.
#
# Usage: scripts/bench-scale.sh
# Env:   BENCH_ONLY       the runs to do, space-separated (default: all five, in that order)
#        BENCH_ARGS       options added to every run (e.g. --linear-attention)
#        HOPSCOTCH_CACHE  cache root (default ~/.cache/hopscotch)
#        CARGO_TARGET_DIR where the release binary is built (default $HOPSCOTCH_CACHE/target)
set -euo pipefail

# shellcheck source=scripts/bench-lib.sh
source "$(dirname "$0")/bench-lib.sh"
out="$cache/bench/scale"
bench_setup "$out"
runs="${BENCH_ONLY:-smollm2 1b 1b-q4 8b 8b-q4}"
venv="$cache/bench/numpy-venv"

# the generator's numpy, in a venv of its own
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import numpy' 2>/dev/null; then
    say "setting up $venv (numpy)"
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install -q numpy
fi

# synth NAME LAYERS HIDDEN FF HEADS KV_HEADS TIED: a random-weight Llama folder in the cache.
synth() {
    local dir="$cache/bench/synth-$1"
    if [ ! -f "$dir/.ready" ]; then
        say "writing $dir"
        rm -rf "$dir" "$dir.tmp"
        mkdir -p "$dir.tmp"
        cp "$repo/tests/fixtures/smollm2-tokenizer/tokenizer.json" \
            "$repo/tests/fixtures/smollm2-tokenizer/tokenizer_config.json" "$dir.tmp/"
        "$venv/bin/python" - "$dir.tmp" "$2" "$3" "$4" "$5" "$6" "$7" <<'PY'
import json, struct, sys
import numpy as np

d, L, H, FF, NH, NKV, tied = sys.argv[1], *map(int, sys.argv[2:7]), sys.argv[7] == "1"
V, KV = 49152, H // NH * NKV
json.dump({
    "architectures": ["LlamaForCausalLM"], "model_type": "llama",
    "hidden_size": H, "intermediate_size": FF, "num_hidden_layers": L,
    "num_attention_heads": NH, "num_key_value_heads": NKV, "vocab_size": V,
    "max_position_embeddings": 8192, "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
    "hidden_act": "silu", "tie_word_embeddings": tied, "torch_dtype": "bfloat16",
    "bos_token_id": 1, "eos_token_id": 2, "attention_bias": False, "mlp_bias": False,
}, open(f"{d}/config.json", "w"), indent=2)
tensors = [("model.embed_tokens.weight", (V, H))]
for i in range(L):
    p = f"model.layers.{i}."
    tensors += [
        (p + "input_layernorm.weight", (H,)), (p + "self_attn.q_proj.weight", (H, H)),
        (p + "self_attn.k_proj.weight", (KV, H)), (p + "self_attn.v_proj.weight", (KV, H)),
        (p + "self_attn.o_proj.weight", (H, H)), (p + "post_attention_layernorm.weight", (H,)),
        (p + "mlp.gate_proj.weight", (FF, H)), (p + "mlp.up_proj.weight", (FF, H)),
        (p + "mlp.down_proj.weight", (H, FF)),
    ]
tensors += [("model.norm.weight", (H,))] + ([] if tied else [("lm_head.weight", (V, H))])
# shards of about 4 GB, as published checkpoints come
shards, size = [[]], 0
for name, shape in tensors:
    n = 2 * int(np.prod(shape))
    if size + n > 4 << 30 and shards[-1]:
        shards.append([])
        size = 0
    shards[-1].append((name, shape))
    size += n
rng = np.random.default_rng(2025)
weight_map = {}
for k, shard in enumerate(shards):
    fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
    header, off = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in shard:
        n = 2 * int(np.prod(shape))
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
        weight_map[name] = fname
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    with open(f"{d}/{fname}", "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for name, shape in shard:
            n = int(np.prod(shape))
            scale = 1.0 if len(shape) == 1 else 0.02
            for s in range(0, n, 1 << 24):
                x = rng.standard_normal(min(1 << 24, n - s), dtype=np.float32) * scale
                if len(shape) == 1:
                    x = 1.0 + 0.1 * x
                u = x.view(np.uint32)
                u = (u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
                f.write(u.astype("<u2").tobytes())
json.dump({"metadata": {}, "weight_map": weight_map},
          open(f"{d}/model.safetensors.index.json", "w"), indent=2)
PY
        touch "$dir.tmp/.ready"
        mv "$dir.tmp" "$dir"
    fi
    echo "$dir"
}

# q4 DIR: its q4_k_m GGUF beside it in the cache.
q4() {
    local gguf="$1.q4_k_m.gguf"
    if [ ! -f "$gguf" ]; then
        say "converting $1 to q4_k_m"
        "$bin" convert "$1" --type q4_k_m -o "$gguf" >&2
    fi
    echo "$gguf"
}

results="$out/results.tsv"
: >"$results"
# timed NAME CMD...: runs CMD under GNU time and adds a row to the results (GNU time puts a
# line about a failed command's status before its figures: the figures are the last line).
timed() {
    local name="$1"
    shift
    say "$name: $*"
    local status=0
    /usr/bin/time -f '%e %U %S %M' -o "$out/$name.time" "$@" >"$out/$name.log" 2>&1 || status=$?
    awk -v name="$name" -v status="$status" \
        '{ printf "%s\t%s\t%.0f\t%.2f\t%s\n", name, $1, $2 + $3, $4 / 1048576, status }' \
        <(tail -n 1 "$out/$name.time") >>"$results"
    tail -n 3 "$out/$name.log" >&2
}

read -r -a extra <<<"${BENCH_ARGS:-}"
minimal_fit=(--skip 1 --fit-docs 8 --shortlist 1 --candidate-steps 1 --final-steps 1 --force
    ${extra[@]+"${extra[@]}"})
run_args=(--skip 4 --limit 300 --force ${extra[@]+"${extra[@]}"})
for r in $runs; do
    case "$r" in
        smollm2) timed smollm2 "$bin" run "$model" --task "$task" --skip 4 --type q4_k_m \
            --limit 300 -o "$out/smollm2" --force ${extra[@]+"${extra[@]}"} ;;
        1b) timed 1b "$bin" run "$(synth llama-3.2-1b 16 2048 8192 32 8 1)" --task "$task" \
            "${run_args[@]}" -o "$out/1b" ;;
        1b-q4) timed 1b-q4 "$bin" run "$(q4 "$(synth llama-3.2-1b 16 2048 8192 32 8 1)")" \
            --task "$task" "${run_args[@]}" -o "$out/1b-q4" ;;
        8b) timed 8b "$bin" fit "$(synth llama-3.1-8b 32 4096 14336 32 8 0)" --task "$task" \
            "${minimal_fit[@]}" -o "$out/8b.json" ;;
        8b-q4) timed 8b-q4 "$bin" fit "$(q4 "$(synth llama-3.1-8b 32 4096 14336 32 8 0)")" \
            --task "$task" "${minimal_fit[@]}" -o "$out/8b-q4.json" ;;
        *) echo "unknown run $r (smollm2 1b 1b-q4 8b 8b-q4)" >&2; exit 2 ;;
    esac
done

say "summary ($(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg))"
printf '| run | wall s | CPU s | peak RSS GiB | exit |\n|---|---|---|---|---|\n'
while IFS=$'\t' read -r name wall cpu rss status; do
    printf '| %s | %s | %s | %s | %s |\n' "$name" "$wall" "$cpu" "$rss" "$status"
done <"$results"
