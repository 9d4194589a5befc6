#!/usr/bin/env bash
# Issue "Deployment", item Install: checks that `cargo install --path .`
# installs a working `bitnet`, builds the `dist` profile (fat LTO, one
# codegen unit, stripped) and prints the sizes of the release binary, the
# release binary stripped, and the dist binary. Not in CI (the LTO build
# alone takes longer than CI's budget allows on 2 cores); run it on a
# release and copy the figures into docs/guide.md's Install section.
#   scripts/install-size.sh            # uses ./target, as cargo build does
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
# --target-dir: reuse this checkout's release build instead of a fresh one.
cargo install --quiet --locked --path . --root "$root" --target-dir target
"$root/bin/bitnet" --version
"$root/bin/bitnet" run -m testdata/models/stories260K/stories260K.gguf -p "Once upon a time" -n 8 --temp 0 > /dev/null
echo "cargo install --path .: ok ($root/bin/bitnet runs stories260K)"
cargo build --quiet --locked --release
cargo build --quiet --locked --profile dist
strip -o "$root/bitnet.stripped" target/release/bitnet
mb() { python3 -c "import os, sys; print(f'{os.path.getsize(sys.argv[1]) / 1e6:.1f} MB')" "$1"; }
echo "release            $(mb target/release/bitnet)  target/release/bitnet"
echo "release, stripped  $(mb "$root/bitnet.stripped")"
echo "dist               $(mb target/dist/bitnet)  target/dist/bitnet (fat LTO, one codegen unit, stripped)"
