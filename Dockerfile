# bitnet-rs's server in a container.
#
#   docker build -t bitnet-rs .
#   docker run -p 8080:8080 -v /path/to/models:/models:ro bitnet-rs \
#       serve --model /models/model.gguf --host 0.0.0.0
#
# Build arguments:
#   MODEL_DIR   a folder of the build context copied to /models (bake a model in)
#   BUILD       `source` (default): compile in a Rust stage; `prebuilt`: take the
#               `bitnet` binary at the root of the build context (built on a
#               Debian 12 host), as the tests do
#   RUST_IMAGE  the builder image (default rust:1-bookworm)
#   BASE_IMAGE  the runtime image (default debian:bookworm-slim)
# Build with BuildKit (DOCKER_BUILDKIT=1, the default of docker buildx), which
# skips the stage BUILD does not pick.

ARG RUST_IMAGE=rust:1-bookworm
ARG BASE_IMAGE=debian:bookworm-slim
ARG BUILD=source

FROM ${RUST_IMAGE} AS build-source
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p bitnet && install -s target/release/bitnet /bitnet

FROM ${BASE_IMAGE} AS build-prebuilt
COPY bitnet /bitnet

FROM build-${BUILD} AS build

FROM ${BASE_IMAGE}
ARG MODEL_DIR=deploy/docker/no-model
COPY --from=build /bitnet /usr/local/bin/bitnet
COPY ${MODEL_DIR}/ /models/
# No shell user is needed: a numeric user that owns nothing but /tmp's use.
USER 10001:10001
ENV BITNET_PORT=8080 HOME=/tmp
EXPOSE 8080
# /health answers 503 while the model loads and 200 once it serves; bash's
# /dev/tcp asks it without curl in the image. Set BITNET_PORT to match --port.
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/${BITNET_PORT} && printf 'GET /health HTTP/1.0\\r\\nHost: localhost\\r\\n\\r\\n' >&3 && head -n 1 <&3 | grep -q ' 200 '"]
# `bitnet serve` handles SIGTERM itself as PID 1: it takes no new
# connections, lets running requests finish, and exits 0.
ENTRYPOINT ["bitnet"]
CMD ["serve", "--model", "/models/model.gguf", "--host", "0.0.0.0", "--port", "8080"]
