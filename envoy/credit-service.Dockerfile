# syntax=docker/dockerfile:1
# The credit service (`tollgate-credit`, the workspace crate in credit-service/) as a container image.
# Build context: the repository root, which the workspace needs whole (Cargo.toml, Cargo.lock, every
# member); .dockerignore keeps build output out of it.
#
#   docker build -f envoy/credit-service.Dockerfile -t tollgate-credit .
#   docker run -p 8081:8081 -v credit-data:/var/lib/tollgate-credit \
#     -e TOLLGATE_CREDIT_SERVICE_TOKEN=… -e TOLLGATE_CREDIT_ADMIN_TOKEN=… tollgate-credit
#
# docker-compose.yaml runs it on the host network with `--listen 127.0.0.1:8081`.

FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
# Cache mounts keep the registry and the target dir between builds; the binary is copied out of the
# cached target dir, which is not part of the image.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p tollgate-credit \
 && cp target/release/tollgate-credit /usr/local/bin/tollgate-credit

# Same Debian release as the build stage, so the binary finds the glibc it was linked against.
FROM debian:bookworm-slim
# CA certificates for a PostgreSQL ledger over TLS.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --user-group --home-dir /var/lib/tollgate-credit --create-home tollgate-credit
COPY --from=build /usr/local/bin/tollgate-credit /usr/local/bin/tollgate-credit
USER tollgate-credit
# The working directory is the volume, so the default SQLite ledger (a file relative to it) persists.
WORKDIR /var/lib/tollgate-credit
VOLUME /var/lib/tollgate-credit
EXPOSE 8081
ENTRYPOINT ["/usr/local/bin/tollgate-credit"]
CMD ["--listen", "0.0.0.0:8081"]
