#!/usr/bin/env bash
# Builds the Python package (maturin, into the workspace's target/), installs
# it into a fresh virtualenv with numpy and pytest, and runs python/tests.
# BITNET_PY_PROFILE=release builds optimized code (default: debug, which
# reuses `cargo test`'s build).
set -euo pipefail
cd "$(dirname "$0")"
venv=$PWD/../target/python-venv
rm -rf "$venv" ../target/wheels-test
python3 -m venv "$venv"
"$venv/bin/pip" install -q maturin numpy pytest
flags=()
[ "${BITNET_PY_PROFILE:-debug}" = release ] && flags+=(--release)
"$venv/bin/maturin" build -q "${flags[@]}" --out ../target/wheels-test
"$venv/bin/pip" install -q ../target/wheels-test/*.whl
# Import from the installed wheel, not this folder.
cd tests && "$venv/bin/python" -m pytest -q "$@" .
