#!/usr/bin/env bash
# Installs what the build needs (cmake, clang and libclang for the vendored llama.cpp and its
# bindgen bindings) and fetches the real model, text and task data into the cache
# (${HOPSCOTCH_CACHE:-$HOME/.cache/hopscotch}). Idempotent.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
need=()
command -v cmake >/dev/null 2>&1 || need+=(cmake)
command -v clang >/dev/null 2>&1 || need+=(clang)
ls /usr/lib/llvm-*/lib/libclang.so >/dev/null 2>&1 || need+=(libclang-dev)
if [ ${#need[@]} -gt 0 ]; then
    echo "setup: installing ${need[*]}" >&2
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >&2
fi
command -v cargo >/dev/null 2>&1 || { echo "setup: cargo is missing (install Rust with rustup)" >&2; exit 1; }
"$here/fetch-model.sh" >/dev/null
"$here/fetch-text.sh" >/dev/null
"$here/fetch-tasks.sh" >/dev/null
