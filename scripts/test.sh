#!/usr/bin/env bash
# The whole test suite on this machine (the README's test command): installs
# what the tests need, then runs the tests of every crate and of the Python
# bindings. Debian packages come from apt (as root, or with sudo), Python
# packages from pip, playwright-core from npm. The tests need the Rust
# toolchain, the files in testdata/, cmake and libclang (bitnet-crossval
# builds llama.cpp through llama-cpp-sys-2), NVRTC and ptxas (below). A test
# whose tool is missing skips with a message, unless BITNET_REQUIRE_TOOLS
# (and BITNET_REQUIRE_NVRTC) are set, as .ci/run sets them.
set -euo pipefail
cd "$(dirname "$0")/.."
# Chromium is for the chat page's browser test (tests/server.rs).
pkgs=""
command -v cmake >/dev/null || pkgs="$pkgs cmake"
ls /usr/lib/llvm-*/lib/libclang.so* >/dev/null 2>&1 || pkgs="$pkgs libclang-dev"
command -v chromium >/dev/null || pkgs="$pkgs chromium"
# curl runs in the guide's runnable blocks (tests/docs.rs).
command -v curl >/dev/null || pkgs="$pkgs curl"
# valgrind runs the C API's example (capi/tests).
command -v valgrind >/dev/null || pkgs="$pkgs valgrind"
# Prometheus (with promtool) scrapes a live server in tests/deploy.rs, which
# also builds and runs the Dockerfile's image on a Docker daemon of its own
# (Debian's docker.io) from a base image made with debootstrap.
command -v prometheus >/dev/null || pkgs="$pkgs prometheus"
command -v dockerd >/dev/null || pkgs="$pkgs docker.io"
command -v debootstrap >/dev/null || pkgs="$pkgs debootstrap"
if [ -n "$pkgs" ]; then
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -q
  $SUDO apt-get install -y -q --no-install-recommends $pkgs
fi
# NVRTC and ptxas, from NVIDIA's pip wheels: the CUDA kernels are compiled
# to PTX and assembled in the tests, which need no GPU.
nv=$PWD/target/nvidia-wheels
[ -e "$nv/nvidia/cuda_nvrtc/lib/libnvrtc.so.12" ] || python3 -m pip install -q --no-deps --target "$nv" nvidia-cuda-nvrtc-cu12 nvidia-cuda-nvcc-cu12
# The official OpenAI Python client and schemathesis, for the server tests
# (tests/server.rs).
python3 -c "import openai" 2>/dev/null || python3 -m pip install -q openai
command -v st >/dev/null || python3 -m pip install -q "schemathesis>=4.1,<5"
# Helm's own library and the Kubernetes schemas check the chart offline (tests/deploy.rs).
python3 -c "import helm_python, kubernetes_validate, yaml" 2>/dev/null || python3 -m pip install -q helm-python-sdk kubernetes-validate pyyaml
# cargo-deny checks the dependency policy in deny.toml (tests/deny.rs).
command -v cargo-deny >/dev/null || cargo install -q cargo-deny --locked
# playwright-core drives that Chromium (the browser itself comes from Debian).
[ -d tests/browser/node_modules/playwright-core ] || npm ci --prefix tests/browser --no-audit --no-fund
export BITNET_NVRTC_LIB="$nv/nvidia/cuda_nvrtc/lib/libnvrtc.so.12" PATH="$PATH:$nv/nvidia/cuda_nvcc/bin"
cargo --version
# Each phase's wall time goes to the log (the README quotes them).
phase() { local t=$SECONDS; "$@"; echo "== $* took $((SECONDS - t)) s (script total $SECONDS s)"; }
phase cargo test --workspace
# The Python bindings: a wheel from the same (debug) build, in a fresh virtualenv.
phase python/test.sh
# The WebAssembly build (Debian's Rust, installed by the script) in Node.js.
phase scripts/wasm.sh
