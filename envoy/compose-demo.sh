#!/usr/bin/env bash
# The demo in containers (envoy/docker-compose.yaml), with whichever compose engine is here:
# `docker compose`, `docker-compose` or `podman-compose`, the first whose engine answers (COMPOSE="…"
# picks one). Brings it up, waits until the gateway is healthy, prints `make demo`'s walkthrough
# (read from envoy/demo.sh, so the two cannot drift) and brings it all down, ledger included, on
# Ctrl-C. Called by `make compose-demo` once the module and the `tollgate` command are built.
#
#   envoy/compose-demo.sh CLI                 run the demo
#   envoy/compose-demo.sh --walkthrough CLI   only print the walkthrough (tests/compose.rs)
#
# COMPOSE_IMAGES=FILE: KEY=VALUE lines exported before compose reads its file, e.g. the
# TOLLGATE_*_IMAGE names of local stand-ins that envoy/standin/build.sh writes to build/standin.env.
set -euo pipefail
cd "$(dirname "$0")/.."

file=envoy/docker-compose.yaml
project=tollgate-demo
gateway=http://127.0.0.1:10000 # the ports docker-compose.yaml publishes
admin=http://127.0.0.1:9901

only_walkthrough=false
if [[ ${1:-} == --walkthrough ]]; then
  only_walkthrough=true
  shift
fi
cli=${1:?usage: compose-demo.sh [--walkthrough] CLI}

# The compose command, as words, and the engine (docker or podman) whose containers it runs.
compose=()
engine=

# Picks the first compose command whose engine answers, or says what is missing and exits.
pick_compose() {
  local found=() candidate
  if [[ -n ${COMPOSE:-} ]]; then
    read -ra compose <<<"$COMPOSE"
  else
    local words
    for candidate in "docker compose" docker-compose podman-compose; do
      read -ra words <<<"$candidate"
      "${words[@]}" version >/dev/null 2>&1 || continue
      # A client without its engine (no Docker daemon, say) cannot run anything.
      if "${words[@]}" -f "$file" -p "$project" ps >/dev/null 2>&1; then
        compose=("${words[@]}")
        break
      fi
      found+=("$candidate (installed, but its engine does not answer: is the Docker daemon or podman running?)")
    done
  fi
  if [[ ${#compose[@]} == 0 ]]; then
    {
      echo "make compose-demo needs a compose engine, and none answers here. Install one of:"
      echo "  - Docker Engine with the compose plugin (\`docker compose\`), or Docker Desktop 4.x on macOS/Windows"
      echo "  - docker-compose with a running Docker daemon"
      echo "  - podman with podman-compose 1.1 or later (\`pip install podman-compose\`; Debian 12's 1.0.x cannot run this file)"
      echo "or name one with COMPOSE=\"…\". \`make demo\` runs the same demo without containers."
      for line in "${found[@]}"; do echo "found: $line"; done
    } >&2
    exit 1
  fi
  case ${compose[0]} in
    podman-compose)
      engine=podman
      # podman-compose 1.0.x refuses this file's network and still exits 0.
      local version
      version=$("${compose[@]}" version 2>/dev/null | sed -n 's/^podman-compose version \([0-9.]*\).*/\1/p' | head -n 1)
      if [[ $version == 1.0.* || $version == 0.* ]]; then
        echo "podman-compose $version cannot run $file; install 1.1 or later: pip install podman-compose" >&2
        exit 1
      fi
      ;;
    *) engine=docker ;;
  esac
}

# Prints a block of envoy/demo.sh: the lines from one matching START to the next matching END.
from_demo() {
  local block
  block=$(sed -n "/$1/,/$2/p" envoy/demo.sh)
  [[ -n $block ]] || { echo "envoy/demo.sh has no block /$1/,/$2/: update compose-demo.sh" >&2; exit 1; }
  printf '%s\n' "$block"
}

# The walkthrough of envoy/demo.sh, with its commands for this setup: the credit service is not
# published to the host, so the command that reads its ledger runs curl inside the compose network.
walkthrough() {
  # g, cli and token are what demo.sh's walkthrough names; the eval'd blocks use them.
  # shellcheck disable=SC2034,SC2016
  local g=$gateway token entries
  # shellcheck disable=SC2016
  eval "$(from_demo '^token=\$("\$cli" token' ')$')"
  entries=$(from_demo '^  # ' '^Ctrl-C stops the demo')
  entries=$(eval "cat <<TXT
$entries
TXT")
  # With the image credit-setup runs, where a variable replaces it (stand-ins).
  local run="${TOLLGATE_CURL_IMAGE:+TOLLGATE_CURL_IMAGE=$TOLLGATE_CURL_IMAGE }${compose[*]}"
  run+=" -f $file -p $project run --rm --no-deps -T --entrypoint curl credit-setup"
  cat <<TXT

tollgate demo in containers (${compose[*]}, project $project): Envoy with the filter on $g,
Envoy admin on :9901; the sample upstream and the credit service (account "demo" holds 20 credits)
answer only inside the compose network. Logs: ${compose[*]} -f $file -p $project logs. Try:

TXT
  printf '%s\n' "$entries" |
    sed "s#^  \(sleep [0-9]*; \)\{0,1\}curl \(.*\)http://127\.0\.0\.1:8081/#  \1$run \2http://credit:8081/#"
}

if $only_walkthrough; then
  read -ra compose <<<"${COMPOSE:-docker compose}"
  walkthrough
  exit 0
fi

pick_compose
if [[ -n ${COMPOSE_IMAGES:-} ]]; then
  set -a
  # shellcheck source=/dev/null
  . "$COMPOSE_IMAGES"
  set +a
fi
[[ -f build/tollgate.wasm ]] || { echo "build/tollgate.wasm is missing: run \`make wasm\`" >&2; exit 1; }
# The compose config is envoy.yaml's, regenerated so that an edit to envoy.yaml is in it.
python3 envoy/compose_envoy.py
"$cli" check envoy/envoy.compose.yaml
# Envoy (uid 101) and curl (uid 100) read the mounted files as "others".
chmod a+r envoy/envoy.compose.yaml build/tollgate.wasm envoy/demo_upstream.py envoy/grpc_upstream.py envoy/demo-account.sh
for p in 10000 9901; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
    echo "port $p is already in use on 127.0.0.1; stop what holds it (a \`make demo\`?) and retry" >&2
    exit 1
  fi
done

dc() { "${compose[@]}" -f "$file" -p "$project" "$@"; }

stopped=false
down() {
  $stopped && return
  stopped=true
  trap - INT TERM EXIT
  # Ctrl-C also ends a pipe's reader (`make compose-demo | tee`): bring it down all the same.
  trap '' PIPE
  set +e
  echo; echo "bringing the demo down (containers, network, ledger volume)"
  local start=$SECONDS
  dc down -v >/dev/null 2>&1 || true
  echo "down in $((SECONDS - start)) s"
}

# Prints what the engine says of the demo's containers and their logs, then brings it down.
fail() {
  echo "$1" >&2
  dc ps >&2 || true
  dc logs >&2 || true
  down
  exit 1
}

# A previous run stopped uncleanly leaves containers and a spent ledger behind.
dc down -v >/dev/null 2>&1 || true
trap down EXIT
trap 'down; exit 130' INT TERM
if [[ -z ${TOLLGATE_CREDIT_IMAGE:-} ]]; then
  echo "building the credit service's image (envoy/credit-service.Dockerfile)"
  dc build credit
fi
# The container of a service, by the labels every compose engine sets.
container_of() {
  "$engine" ps -aq --filter "label=com.docker.compose.project=$project" \
    --filter "label=com.docker.compose.service=$1" | head -n 1
}

# Is the service's healthcheck passing? podman runs healthchecks from systemd timers, and without
# systemd (as in many containers and CI machines) never on its own: ask it to run the check now.
healthy() {
  local id
  id=$(container_of "$1")
  [[ -n $id ]] || return 1
  if [[ $engine == podman ]]; then
    podman healthcheck run "$id" >/dev/null 2>&1
  else
    [[ $(docker inspect -f '{{.State.Health.Status}}' "$id" 2>/dev/null) == healthy ]]
  fi
}

# Waits until the service is healthy, or fails after the demo's start-up budget.
wait_healthy() {
  until healthy "$1"; do
    ((SECONDS - start < 180)) || fail "$1 is not healthy $((SECONDS - start)) s after the start"
    sleep 1
  done
  echo "  $1 healthy after $((SECONDS - start)) s"
}

# Starts services without their dependencies: this script orders them itself.
up() { dc up -d --no-deps "$@" >/dev/null 2>&1 || fail "${compose[*]} up $* failed"; }

# The order the compose file's depends_on conditions give, step by step and checked here:
# podman-compose ignores `service_healthy` on podman before 4.6, and there its `up` cannot start
# Envoy after a dependency that has exited (credit-setup); and it exits 0 when a container fails.
start=$SECONDS
echo "starting the demo with ${compose[*]}"
up upstream grpc-upstream credit
wait_healthy credit
up credit-setup
until [[ $("$engine" inspect -f '{{.State.Status}}' "$(container_of credit-setup)" 2>/dev/null) == exited ]]; do
  ((SECONDS - start < 180)) || fail "credit-setup has not finished $((SECONDS - start)) s after the start"
  sleep 1
done
code=$("$engine" inspect -f '{{.State.ExitCode}}' "$(container_of credit-setup)")
[[ $code == 0 ]] || fail "credit-setup failed (exit status $code): the demo account is missing"
echo "  credit-setup created the demo account after $((SECONDS - start)) s"
wait_healthy upstream
# It installs grpcio when it starts: the slowest to be ready.
wait_healthy grpc-upstream
up envoy
wait_healthy envoy
# And from the host, through the published ports.
until curl -fs -o /dev/null "$admin/ready" && curl -fs -o /dev/null "$gateway/health"; do
  ((SECONDS - start < 180)) || fail "the gateway does not answer on $gateway $((SECONDS - start)) s after the start"
  sleep 1
done
echo "up and healthy in $((SECONDS - start)) s"

walkthrough
# Waits for Ctrl-C, and notices a gateway that stops answering.
while curl -fs -o /dev/null "$admin/ready"; do
  sleep 2 &
  wait $! || true
done
fail "the gateway stopped answering"
