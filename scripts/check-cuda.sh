#!/usr/bin/env bash
# Proves that the `cuda` feature compiles and links on a machine without a GPU or an installed
# CUDA toolkit. Nothing here runs on a GPU.
#
# NVIDIA publishes CUDA as PyPI wheels; the cuda-toolkit meta-package pins one consistent set of
# them. The CUDA 12 nvcc wheels hold only ptxas, so this takes CUDA 13.4 (the newest release that
# cudarc 0.19, under candle 0.11, knows), installs the wheels into the cache with
# `pip install --target` (no root, no Python environment touched), and makes that folder a
# CUDA_HOME: unversioned .so links for the linker and a stub libcuda.so for the driver API, which
# only the NVIDIA driver ships. candle links cudarc with `dynamic-linking`, so the binary names
# libcuda.so.1, libcudart.so.13, libcublas(Lt).so.13, libcurand.so.10 and libnvrtc.so.13.
#
# Then, with --features cuda: cargo check of the library, cargo build (library and binary, which
# also compiles candle's kernels with nvcc: about half an hour on two cores), cargo clippy -D
# warnings on every target (tests included), and a load of the built binary with every symbol
# bound at start (LD_BIND_NOW) against the wheels' libraries and the stub driver.
#
# Usage: scripts/check-cuda.sh [build|check]   (check: only the first step; default build: all)
# Environment: HOPSCOTCH_CACHE (default ~/.cache/hopscotch); CARGO_TARGET_DIR (default
# $HOPSCOTCH_CACHE/target-cuda, apart from the CPU build's); CUDA_COMPUTE_CAP (default 80: the
# kernels are compiled for this architecture instead of asking nvidia-smi); CUDAFORGE_THREADS
# (parallel nvcc runs; candle's default is half the CPUs); NICE (default 19: every command runs
# under `nice -n $NICE`).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
mode="${1:-build}"
case "$mode" in build | check) ;; *) echo "usage: $0 [build|check]" >&2; exit 2 ;; esac

cache="${HOPSCOTCH_CACHE:-$HOME/.cache/hopscotch}"
toolkit_version=13.4.3 # cuda-toolkit meta-package: nvcc 13.4.92, cublas 13.8.0.4, curand 10.4.4.72
prefix="$cache/cuda/cu13.4"
nice_level="${NICE:-19}"
run() { nice -n "$nice_level" "$@"; }

# What the build needs from Debian: what setup.sh installs (cmake, clang, libclang for llama.cpp),
# g++ as nvcc's host compiler, and pip.
need=()
command -v cmake >/dev/null 2>&1 || need+=(cmake)
command -v clang >/dev/null 2>&1 || need+=(clang)
ls /usr/lib/llvm-*/lib/libclang.so >/dev/null 2>&1 || need+=(libclang-dev)
command -v g++ >/dev/null 2>&1 || need+=(g++)
command -v python3 >/dev/null 2>&1 || need+=(python3)
python3 -m pip --version >/dev/null 2>&1 || need+=(python3-pip)
if [ ${#need[@]} -gt 0 ]; then
    echo "check-cuda: installing ${need[*]}" >&2
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >&2
fi
command -v cargo >/dev/null 2>&1 || { echo "check-cuda: cargo is missing (install Rust with rustup)" >&2; exit 1; }

# The toolkit: about 0.7 GB of wheels, 1.2 GB installed.
cuda_home="$prefix/nvidia/cu13"
if [ ! -x "$cuda_home/bin/nvcc" ] || [ ! -e "$prefix/cuda_toolkit-$toolkit_version.dist-info" ]; then
    echo "check-cuda: installing CUDA $toolkit_version from PyPI into $prefix" >&2
    rm -rf "$prefix"
    mkdir -p "$(dirname "$prefix")"
    run python3 -m pip install --quiet --no-compile --disable-pip-version-check --target "$prefix" \
        "cuda-toolkit[nvcc,cudart,nvrtc,cublas,curand,cccl]==$toolkit_version" >&2
fi
lib="$cuda_home/lib"
for so in libcudart.so.13 libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libnvrtc.so.13; do
    [ -e "$lib/$so" ] || { echo "check-cuda: $lib/$so is missing" >&2; exit 1; }
    ln -sfn "$so" "$lib/${so%%.so*}.so"
done
# The driver stub: every cu* name in cuda.h, each returning CUDA_ERROR_NO_DEVICE (100), with the
# driver's soname, so the binary asks for the real libcuda.so.1 and a run against the stub behaves
# like a machine without a GPU.
if [ ! -e "$lib/stubs/libcuda.so" ] || [ "$cuda_home/include/cuda.h" -nt "$lib/stubs/libcuda.so" ]; then
    mkdir -p "$lib/stubs"
    grep -ohE '\bcu[A-Z][A-Za-z0-9_]*' "$cuda_home/include/cuda.h" | sort -u |
        sed 's/.*/int &(void) { return 100; }/' >"$lib/stubs/libcuda_stub.c"
    gcc -shared -fPIC -o "$lib/stubs/libcuda.so" -Wl,-soname,libcuda.so.1 "$lib/stubs/libcuda_stub.c"
fi

export CUDA_HOME="$cuda_home" CUDA_PATH="$cuda_home"
export PATH="$cuda_home/bin:$PATH"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-80}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$cache/target-cuda}"
[ -z "${CUDAFORGE_THREADS:-}" ] || export CUDAFORGE_THREADS
nvcc --version | tail -n 2 >&2

cd "$here/.."
step() {
    local name="$1"
    shift
    local start=$SECONDS
    echo "check-cuda: $name" >&2
    run "$@"
    echo "check-cuda: $name passed in $((SECONDS - start)) s" >&2
}
step "cargo check --release --features cuda --lib" cargo check --release --features cuda --lib
[ "$mode" = check ] && exit 0
step "cargo build --release --features cuda" cargo build --release --features cuda
step "cargo clippy --release --features cuda --all-targets -- -D warnings" \
    cargo clippy --release --features cuda --all-targets -- -D warnings

# Load the binary with every symbol resolved at start, against the wheels' libraries and the stub
# driver (linked in as libcuda.so.1 in a scratch folder): a missing library or symbol fails here.
bin="$CARGO_TARGET_DIR/release/hopscotch"
stub_dir="$(mktemp -d)"
trap 'rm -rf "$stub_dir"' EXIT
ln -s "$lib/stubs/libcuda.so" "$stub_dir/libcuda.so.1"
LD_BIND_NOW=1 LD_LIBRARY_PATH="$stub_dir:$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
    "$bin" --help >/dev/null
echo "check-cuda: $bin loads with all CUDA symbols bound (stub driver, no GPU)" >&2
echo "check-cuda: the cuda feature compiles, links and passes clippy (CUDA $(nvcc --version | grep -o 'release [0-9.]*'))"
