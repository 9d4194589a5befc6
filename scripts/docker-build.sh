#!/usr/bin/env bash
# The full multi-stage image build: Rust compiles the server in the builder
# stage (rust:1-bookworm, or RUST_IMAGE), then the slim runtime stage.
# Needs a registry for the two base images (or local ones named by
# RUST_IMAGE / BASE_IMAGE). The tests build the same Dockerfile from the
# binary they already have (deploy/docker/check_container.py, BUILD=prebuilt).
#   scripts/docker-build.sh [TAG] [docker build options...]
set -euo pipefail
cd "$(dirname "$0")/.."
tag=${1:-bitnet-rs}
shift || true
DOCKER_BUILDKIT=1 docker build -t "$tag" \
  --build-arg RUST_IMAGE="${RUST_IMAGE:-rust:1-bookworm}" --build-arg BASE_IMAGE="${BASE_IMAGE:-debian:bookworm-slim}" "$@" .
echo "built $tag; run it with: docker run -p 8080:8080 -v /path/to/models:/models:ro $tag serve --model /models/model.gguf --host 0.0.0.0"
