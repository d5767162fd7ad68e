#!/usr/bin/env bash
# The OCI recipe: packages the filter module as a Wasm image that Istio's WasmPlugin and Envoy
# Gateway's EnvoyExtensionPolicy (type Image) both pull, and pushes it. Called by `make oci` and
# `make oci-push`, which install umoci and skopeo first.
#
#   envoy/oci.sh build MODULE LAYOUT TAG                 an OCI layout at LAYOUT, tagged TAG
#   envoy/oci.sh push LAYOUT TAG DEST [skopeo flags...]  copy LAYOUT:TAG to docker://DEST
#
# Format: the "compat" Wasm image (solo-io/wasm spec-compat.md), a plain OCI image whose single
# `application/vnd.oci.image.layer.v1.tar+gzip` layer holds `plugin.wasm`. README "Ship it" says why.
# Tools, not hand-written JSON: GNU tar writes the layer, umoci the image (config, manifest, index),
# skopeo pushes. umoci writes the layer from our tar because its own `umoci insert` (0.4.7, Debian
# 12) writes layer tars without the end-of-archive blocks (opencontainers/umoci#436).
#
# The image is reproducible: every timestamp in it is the commit's, so one commit and one module give
# one manifest digest.
set -euo pipefail
cd "$(dirname "$0")/.."

# `key = "value"` from the [package] table of Cargo.toml.
cargo_field() {
  sed -n '/^\[package\]/,/^\[/s/^'"$1"' = "\(.*\)"$/\1/p' Cargo.toml | head -n 1
}

# The repository's web address from the `origin` remote, as https (git@host:o/r.git -> https://host/o/r).
source_url() {
  local url
  url=$(git remote get-url origin 2>/dev/null) || return 0
  url=${url%.git}
  case "$url" in
    git@*:*) url="https://${url#git@}"; url="${url/://}" ;; # the first ':' is the host/path separator
    ssh://git@*) url="https://${url#ssh://git@}" ;;
  esac
  echo "$url"
}

build() {
  local module=$1 layout=$2 tag=$3
  [[ -f $module ]] || { echo "$module is missing: run \`make wasm\`" >&2; exit 1; }
  local version description revision epoch created source
  version=$(cargo_field version)
  description=$(cargo_field description)
  revision=$(git rev-parse HEAD 2>/dev/null || echo unknown)
  # A module built from uncommitted changes is not the revision it names.
  if [[ $revision != unknown ]] && ! git diff --quiet HEAD -- 2>/dev/null; then revision="$revision-dirty"; fi
  epoch=$(git log -1 --format=%ct 2>/dev/null || echo 0)
  created=$(date -u -d "@$epoch" +%Y-%m-%dT%H:%M:%SZ)
  source=${OCI_SOURCE:-$(source_url)}

  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  cp "$module" "$work/plugin.wasm"
  # ustar, root-owned, read-only, the commit's mtime: the same bytes on every machine.
  tar --create --file "$work/layer.tar" --directory "$work" --format=ustar --sort=name \
    --mtime="@$epoch" --owner=0 --group=0 --numeric-owner --mode=0444 plugin.wasm

  local labels=(
    "org.opencontainers.image.title=tollgate"
    "org.opencontainers.image.description=$description"
    "org.opencontainers.image.version=$version"
    "org.opencontainers.image.revision=$revision"
    "org.opencontainers.image.created=$created"
    "org.opencontainers.image.licenses=$(cargo_field license)"
  )
  if [[ -n $source ]]; then
    labels+=("org.opencontainers.image.source=$source")
  else
    echo "note: no git remote \`origin\`: set OCI_SOURCE=https://… to label the image's source" >&2
  fi
  # The same metadata as config labels (what `docker inspect` and `skopeo inspect` show) and as
  # manifest annotations (what registries and `oras manifest fetch` show).
  local meta=()
  for label in "${labels[@]}"; do meta+=(--config.label "$label" --manifest.annotation "$label"); done

  rm -rf "$layout"
  mkdir -p "$(dirname "$layout")"
  umoci init --layout "$layout"
  umoci new --image "$layout:$tag"
  umoci raw add-layer --image "$layout:$tag" --history.created "$created" \
    --history.created_by "make oci: plugin.wasm (tollgate $version)" "$work/layer.tar"
  # The module runs on any platform and the Wasm fetchers ignore a single manifest's platform; a fixed
  # value keeps the digest the same whichever machine builds it.
  umoci config --image "$layout:$tag" --no-history --created "$created" --os linux --architecture amd64 \
    "${meta[@]}"
  umoci gc --layout "$layout" # drops the intermediate configs and manifests

  local digest
  digest=sha256:$(skopeo inspect --raw "oci:$layout:$tag" | sha256sum | cut -d' ' -f1)
  echo "$digest" > "$layout.digest"
  echo "$layout (tag $tag): tollgate $version, revision $revision"
  echo "manifest digest: $digest"
  echo "module sha256:   $(sha256sum "$module" | cut -d' ' -f1)"
}

push() {
  local layout=$1 tag=$2 dest=$3
  shift 3
  [[ -f $layout/index.json ]] || { echo "$layout is missing: run \`make oci\`" >&2; exit 1; }
  # --preserve-digests: fail rather than convert the manifest, so the registry holds the digest
  # `make oci` printed (the one to pin in a WasmPlugin or EnvoyExtensionPolicy).
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  skopeo copy --preserve-digests --digestfile "$work/digest" "$@" "oci:$layout:$tag" "docker://$dest"
  echo "pushed $dest@$(cat "$work/digest")"
}

case "${1:-}" in
  build) shift; build "$@" ;;
  push) shift; push "$@" ;;
  *) echo "usage: $0 build MODULE LAYOUT TAG | push LAYOUT TAG DEST [skopeo flags]" >&2; exit 2 ;;
esac
