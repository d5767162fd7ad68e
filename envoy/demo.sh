#!/usr/bin/env bash
# Runs the native demo on the ports envoy/envoy.yaml names: the sample upstream, the gRPC upstream
# (envoy/grpc_upstream.py, with the venv's grpcio), the credit service
# on a fresh SQLite ledger with a "demo" account of 20 credits, and Envoy with tollgate, until
# Ctrl-C. Called by `make demo` once everything is built and installed.
#
# Each walkthrough entry is a comment ending in "(→ STATUS, text the response shows, …)" (a "!"
# before a text: must not show) and one command; tests/demo.rs runs every command and checks that.
set -euo pipefail
envoy=$1
port=$2
cli=${TOLLGATE_CLI:-target/release/tollgate}
credit=${TOLLGATE_CREDIT:-target/release/tollgate-credit}
cd "$(dirname "$0")/.."
mkdir -p build
for p in "$port" 9901 8000 8001 8081; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
    echo "port $p is already in use on 127.0.0.1; stop what holds it (an earlier demo?) and retry" >&2
    exit 1
  fi
done

pids=()
stop() {
  trap - INT TERM EXIT
  echo; echo "stopping the demo"
  kill "${pids[@]}" 2>/dev/null || true
  wait 2>/dev/null || true
}
trap stop INT TERM EXIT

# Wait until URL answers, or fail with LOG if process PID has exited.
wait_for() {
  local url=$1 pid=$2 log=$3
  for _ in $(seq 200); do
    curl -s -o /dev/null "$url" 2>/dev/null && return 0
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "$log:" >&2; cat "$log" >&2; exit 1
    fi
    sleep 0.1
  done
  echo "$url did not answer; see $log" >&2; exit 1
}

export TOLLGATE_CREDIT_SERVICE_TOKEN=demo-service-token-not-for-production TOLLGATE_CREDIT_ADMIN_TOKEN=demo-admin-token-not-for-production
rm -f build/demo-ledger.db build/demo-ledger.db-wal build/demo-ledger.db-shm
"$credit" --listen 127.0.0.1:8081 --database sqlite://build/demo-ledger.db >/dev/null 2>build/demo-credit.log &
pids+=($!)
wait_for http://127.0.0.1:8081/v1/accounts/demo "${pids[0]}" build/demo-credit.log
sh envoy/demo-account.sh

python3 envoy/demo_upstream.py 8000 &
pids+=($!)
"$(dirname "$envoy")/python" envoy/grpc_upstream.py 8001 >/dev/null &
pids+=($!)
"$envoy" -c envoy/envoy.yaml --concurrency 2 --disable-hot-restart --log-level warn \
  --component-log-level wasm:info --log-path build/demo-envoy.log &
pids+=($!)
wait_for http://127.0.0.1:9901/ready "${pids[3]}" build/demo-envoy.log

g=http://127.0.0.1:$port
token=$("$cli" token --secret dG9sbGdhdGUtZGVtby1oczI1Ni1zZWNyZXQtbm90LWZvci1wcm9kdWN0aW9u --kid demo \
  --issuer tollgate-demo --audience demo-api --sub alice --account demo --tier pro --scope read)
cat <<TXT

tollgate demo: Envoy with the filter on $g, the sample upstream on :8000, the gRPC service
demo.Echo on :8001, the credit service on :8081 (account "demo" holds 20 credits), Envoy admin on
:9901. Logs: build/demo-*.log. Try:

  # a public route passes; the upstream echoes what it got; the response carries the security headers (→ 200, x-frame-options: DENY, x-content-type-options: nosniff)
  curl -i $g/health

  # a client cannot forge its identity: the x-tollgate-account it sent never reaches the upstream (→ 200, "path": "/health", !someone-else)
  curl -si -H 'x-tollgate-account: someone-else' $g/health

  # /api/* needs a caller: 401 with WWW-Authenticate and a problem+json body (→ 401, www-authenticate: Bearer, urn:tollgate:problem:unauthenticated)
  curl -i $g/api/items

  # the demo API key: the upstream sees the caller as x-tollgate-* headers and never the key; the call costs 1 credit, billed per request while the gateway opens a grant for the account (→ 200, "x-tollgate-account": "demo", "x-tollgate-auth-method": "api_key", x-credits-charged: 1, x-credits-remaining, x-ratelimit-remaining)
  curl -i -H 'x-api-key: tg_demo_key_not_for_production' $g/api/items

  # a second later the gateway holds a grant for the account: this call, a signed demo JWT (made with: $cli token …) for the same caller on the pro tier, is paid from it with no callout (→ 200, "x-tollgate-auth-method": "jwt", "x-tollgate-tier": "pro", x-credits-charged: 1)
  sleep 1; curl -i -H 'authorization: Bearer $token' $g/api/items

  # 50 units of work at 1 credit each, with 18 left: more than the grant holds, so it is billed per request, and the credit service says 402; the upstream never sees it (→ 402, "required":50, urn:tollgate:problem:insufficient-credits)
  curl -i -H 'x-units: 50' -H 'x-api-key: tg_demo_key_not_for_production' $g/api/items

  # gRPC, with a real gRPC client (grpcio, raw bytes): the demo API key calls demo.Echo/Say; 1 credit, charged on grpc-status 0 and told in the trailing metadata (→ 0, message: hello, x-credits-charged: 1, x-ratelimit-remaining)
  .venv/bin/python envoy/grpc_client.py ${g#http://} /demo.Echo/Say -H 'x-api-key: tg_demo_key_not_for_production'

  # gRPC without a credential: the gRPC status UNAUTHENTICATED with a short grpc-message, never a JSON document (→ 16, unauthenticated, grpc-message: this route requires authentication, !{)
  .venv/bin/python envoy/grpc_client.py ${g#http://} /demo.Echo/Say

  # /auth/login allows 5 a minute per client address: the sixth is 429 with Retry-After and the limit's headers (→ 429, retry-after:, x-ratelimit-limit: 5, x-ratelimit-remaining: 0, ratelimit-policy: "login-per-minute";q=5;w=60)
  for i in 1 2 3 4 5; do curl -s -o /dev/null -d '{}' -H 'content-type: application/json' $g/auth/login; done; curl -i -d '{}' -H 'content-type: application/json' $g/auth/login

  # paths no route names are refused (→ 404, urn:tollgate:problem:not-found)
  curl -i $g/nowhere

  # a control character in the path (→ 400, urn:tollgate:problem:invalid-path)
  curl -i '$g/health/%0a'

  # a body over the route's limit (64 KiB on /auth/): 413 before the body is read (→ 413, urn:tollgate:problem:payload-too-large)
  head -c 70000 /dev/zero | curl -i -H 'content-type: application/json' --data-binary @- $g/auth/signup

  # the same body streamed without Content-Length is cut off at the limit (→ 413, urn:tollgate:problem:payload-too-large)
  head -c 70000 /dev/zero | curl -i -H 'content-type: application/json' -H 'transfer-encoding: chunked' --data-binary @- $g/auth/signup

  # a content type the route does not accept for POST (→ 415, urn:tollgate:problem:unsupported-media-type)
  curl -i -H 'content-type: text/xml' -d '<x/>' $g/auth/signup

  # what was spent, in the credit service's ledger: the first call's reservation and commit, the grant's hold and the gateway's report of what it spent from it, which a worker syncs every second and the gateway reports every second (→ 200, "kind":"reserve", "kind":"commit", "kind":"grant", "kind":"grant_use")
  sleep 2; curl -i -H 'authorization: Bearer demo-admin-token-not-for-production' http://127.0.0.1:8081/v1/accounts/demo/transactions

  # and per policy and hour, however it was billed (→ 200, "policy":"api", "credits":2)
  curl -i -H 'authorization: Bearer demo-admin-token-not-for-production' http://127.0.0.1:8081/v1/accounts/demo/usage

  # the filter's counters in Envoy's stats (→ 200, tollgate_requests_allowed, tollgate_requests_denied_402)
  curl -i http://127.0.0.1:9901/stats/prometheus

Ctrl-C stops the demo.
TXT
wait -n "${pids[@]}"
