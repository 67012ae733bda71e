# syntax=docker/dockerfile:1
#
# One image per SecurePay service (compose.yaml builds it four times):
#   docker build --build-arg SERVICE=securepay-payment -t securepay/payment:dev .
# SERVICE is the binary (= crate) name: securepay-gateway | securepay-payment | securepay-account |
# securepay-notification.

# ---------------------------------------------------------------- build
FROM rust:1-bookworm AS builder
ARG SERVICE
RUN case "${SERVICE}" in \
        securepay-gateway|securepay-payment|securepay-account|securepay-notification) ;; \
        *) echo "build-arg SERVICE must be one of securepay-{gateway,payment,account,notification}, got '${SERVICE}'" >&2; exit 1 ;; \
    esac
# rdkafka builds librdkafka from source (`cmake-build`): cmake, and libcurl for its HTTP client.
# protoc is vendored by the build scripts (protoc-bin-vendored), so no protobuf-compiler here.
RUN apt-get update \
    && apt-get install -y --no-install-recommends cmake libcurl4-openssl-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# sqlx checks its queries against committed metadata, never against a live database at build time.
ENV SQLX_OFFLINE=true
COPY . .
# The cargo registry and target dir are BuildKit caches shared by the four service builds, so the
# workspace's common dependencies compile once. --locked: the image builds exactly Cargo.lock.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target,id=securepay-target \
    cargo build --release --locked -p "${SERVICE}" --bin "${SERVICE}" \
    && install -D -m 0755 "target/release/${SERVICE}" "/out/${SERVICE}"

# ---------------------------------------------------------------- run
FROM debian:bookworm-slim AS runtime
ARG SERVICE
# ca-certificates for outbound TLS; curl for the compose healthcheck (it also brings the libcurl that
# librdkafka may link against).
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/*
# A fixed, unprivileged uid: the service needs no root, and owns no file in the image.
RUN groupadd --system --gid 10001 securepay \
    && useradd --system --uid 10001 --gid securepay --no-create-home --shell /usr/sbin/nologin securepay \
    && install -d -o 10001 -g 10001 -m 0750 /keys
# /keys: where compose's gateway-dev-keys writes the development JWT key and JWKS. A fresh named volume
# mounted there takes this directory's owner, so the service uid can write (and later read) it.
COPY --from=builder "/out/${SERVICE}" "/usr/local/bin/${SERVICE}"
# A stable entrypoint path whatever the service, so ENTRYPOINT needs no build-arg expansion.
RUN ln -s "/usr/local/bin/${SERVICE}" /usr/local/bin/securepay-service
ENV RUST_LOG=info
USER 10001:10001
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/securepay-service"]
