# The credit service (`tollgate-credit`, the workspace crate in credit-service/) as a container image.
# Build context: the repository root, which the workspace needs whole (Cargo.toml, Cargo.lock, every
# member); .dockerignore keeps build output out of it.
#
#   docker build -f envoy/credit-service.Dockerfile -t tollgate-credit .
#   docker run -p 8081:8081 -v credit-data:/var/lib/tollgate-credit \
#     -e TOLLGATE_CREDIT_SERVICE_TOKEN=… -e TOLLGATE_CREDIT_ADMIN_TOKEN=… tollgate-credit
#
# Needs BuildKit (the `RUN --mount=type=cache` below): the default builder of Docker Engine 23+ and
# Docker Desktop; with docker-compose 1.x set DOCKER_BUILDKIT=1 COMPOSE_DOCKER_CLI_BUILD=1. Podman
# (buildah) understands it as it is.
#
# Base images are pinned by digest, the tag alongside (README "The demo in containers" says where the
# digests come from). The build arguments replace them, e.g. with local images where no registry is
# reachable; CREDIT_BINARY_FROM=IMAGE takes /usr/local/bin/tollgate-credit from IMAGE instead of
# compiling it (envoy/standin/build.sh does that with a binary built on the host).
ARG RUST_IMAGE=docker.io/library/rust:1.98.1-bookworm@sha256:93ce27a88655056a51dbdd8f5f2d7ddc071c7b0070fb288a37b5a285fc83971e
ARG DEBIAN_IMAGE=docker.io/library/debian:12.12-slim@sha256:d5d3f9c23164ea16f31852f95bd5959aad1c5e854332fe00f7b3a20fcc9f635c
ARG CREDIT_BINARY_FROM=build

FROM ${RUST_IMAGE} AS build
WORKDIR /src
COPY . .
# Cache mounts keep the registry and the target dir between builds; the binary is copied out of the
# cached target dir, which is not part of the image.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p tollgate-credit \
 && cp target/release/tollgate-credit /usr/local/bin/tollgate-credit

# The stage the binary is taken from: `build` above, or the image CREDIT_BINARY_FROM names (BuildKit
# and buildah then skip `build`).
FROM ${CREDIT_BINARY_FROM} AS binary

# The same Debian release as the build stage, so the binary finds the glibc it was linked against.
FROM ${DEBIAN_IMAGE}
# CA certificates for a PostgreSQL ledger over TLS.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --user-group --home-dir /var/lib/tollgate-credit --create-home tollgate-credit
COPY --from=binary /usr/local/bin/tollgate-credit /usr/local/bin/tollgate-credit
USER tollgate-credit
# The working directory is the volume, so the default SQLite ledger (a file relative to it) persists.
WORKDIR /var/lib/tollgate-credit
VOLUME /var/lib/tollgate-credit
EXPOSE 8081
ENTRYPOINT ["/usr/local/bin/tollgate-credit"]
CMD ["--listen", "0.0.0.0:8081"]
