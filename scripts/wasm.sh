#!/usr/bin/env bash
# Builds bitnet-rs for WebAssembly (wasm/, target wasm32-wasip1), assembles a
# package in target/wasm/pkg (bitnet.mjs, bitnet_wasm.wasm, package.json) and
# runs its tests in Node.js and, where installed, in headless Chromium.
# `scripts/wasm.sh --build` stops after the build.
#
# rustup's toolchain here has no wasm32 standard library and cannot fetch one;
# Debian's Rust can build it from source (-Zbuild-std), so that is what this
# uses: rustc-web and its standard library's source, wasi-libc and lld. They
# are installed with apt (as root, or with sudo) when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
pkgs=""
for p in rustc-web cargo-web rust-web-src rust-web-llvm lld-22 wasi-libc; do
  dpkg -s "$p" >/dev/null 2>&1 || pkgs="$pkgs $p"
done
if [ -n "$pkgs" ]; then
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -q
  $SUDO apt-get install -y -q --no-install-recommends $pkgs
fi
# Debian's rustc (the rustup one on PATH has no wasm32 std to build from).
export RUSTC=/usr/bin/rustc RUSTC_BOOTSTRAP=1
export RUSTFLAGS="-L /usr/lib/wasm32-wasi"
export CARGO_PROFILE_RELEASE_DEBUG=false CARGO_PROFILE_RELEASE_STRIP=true
/usr/bin/cargo build --release -p bitnet-wasm --target wasm32-wasip1 \
  -Zbuild-std=std,panic_abort --target-dir target/wasm/build
pkg=target/wasm/pkg
mkdir -p "$pkg"
cp target/wasm/build/wasm32-wasip1/release/bitnet_wasm.wasm wasm/js/bitnet.mjs wasm/js/package.json "$pkg"/
echo "WebAssembly package: $pkg ($(du -h "$pkg/bitnet_wasm.wasm" | cut -f1) module)"
[ "${1:-}" = --build ] && exit 0
node --test wasm/test/stories260k.test.mjs
# The same package in a real browser, where scripts/test.sh has installed one.
if [ -d tests/browser/node_modules/playwright-core ] && command -v chromium >/dev/null; then
  node wasm/test/browser.mjs "$pkg" "$(command -v chromium)"
elif [ -n "${BITNET_REQUIRE_TOOLS:-}" ]; then
  echo "the browser check needs Chromium and playwright-core (npm ci --prefix tests/browser)" >&2
  exit 1
else
  echo "skipped the browser check: no Chromium or playwright-core (npm ci --prefix tests/browser)"
fi
