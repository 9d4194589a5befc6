#!/usr/bin/env bash
# The unit and integration tests of bitnet-codegen (the SIMD and JIT
# kernels, the thread pool) and bitnet-runtime (the executors, the KV
# cache, artifacts), and bitnet-fuzzing's replay of every fuzz seed and
# past crash (models opened and stepped on every ISA, artifacts, the
# server), under AddressSanitizer, with nightly Rust. Every out-of-bounds
# access, use after free or leak fails the run.
#
#   scripts/asan.sh [cargo test arguments, e.g. a test name]
#
# The tests build into target/asan; --target keeps build scripts and proc
# macros uninstrumented. Takes ~15 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
# -Zsanitizer is unstable: nightly's rustc, else the one toolchain with
# RUSTC_BOOTSTRAP=1.
if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then tc=(+nightly); else tc=(); export RUSTC_BOOTSTRAP=1; fi
host=$(rustc "${tc[@]}" -vV | sed -n 's/^host: //p')
export RUSTFLAGS="-Zsanitizer=address -Cdebug-assertions=on" RUSTDOCFLAGS="-Zsanitizer=address"
export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=1:detect_stack_use_after_return=1:strict_string_checks=1}"
cargo "${tc[@]}" test --target "$host" --target-dir target/asan -p bitnet-codegen -p bitnet-runtime -p bitnet-fuzzing --lib --tests "$@"
