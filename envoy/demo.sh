#!/usr/bin/env bash
# Runs the native demo: the sample upstream and Envoy with tollgate, on the ports envoy/envoy.yaml
# names, until Ctrl-C. Called by `make demo` after the module and Envoy are built and installed.
set -euo pipefail
envoy=$1
port=$2
cd "$(dirname "$0")/.."
mkdir -p build
for p in "$port" 9901 8000; do
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

python3 envoy/demo_upstream.py 8000 &
pids+=($!)
"$envoy" -c envoy/envoy.yaml --concurrency 2 --disable-hot-restart --log-level warn \
  --component-log-level wasm:info --log-path build/demo-envoy.log &
pids+=($!)

for _ in $(seq 100); do
  curl -fs -o /dev/null "http://127.0.0.1:9901/ready" 2>/dev/null && break
  if ! kill -0 "${pids[1]}" 2>/dev/null; then
    echo "Envoy exited; its log:" >&2; cat build/demo-envoy.log >&2; exit 1
  fi
  sleep 0.1
done

g=http://127.0.0.1:$port
cat <<TXT

tollgate demo: Envoy with the filter on $g, the sample upstream on :8000, Envoy admin on :9901.
Envoy's log: build/demo-envoy.log. Try:

  # a public route passes; the upstream echoes what it got, the response carries security headers
  curl -i $g/health

  # an identity header sent by the client never reaches the upstream (no x-tollgate-account below)
  curl -s -H 'x-tollgate-account: someone-else' $g/health

  # /api/* and /billing/* need a caller: 401 with WWW-Authenticate and a problem+json body
  curl -i $g/api/items

  # the demo API key (the config holds only its SHA-256; make your own with target/release/tollgate keygen):
  # the upstream sees the caller as x-tollgate-* headers, and never the key
  curl -s -H 'x-api-key: tg_demo_key_not_for_production' $g/api/items

  # a wrong key: 401 with a problem+json body that says why, never echoing the key
  curl -i -H 'x-api-key: tg_wrong' $g/api/items

  # paths no route names are refused (404); so is a route whose Envoy metadata names the closed policy
  curl -i $g/nowhere
  curl -i $g/internal/admin

  # a control character in the path: 400
  curl -i '$g/health/%0a'

  # a body over the route's limit (64 KiB on /auth/): 413 before the body is read ...
  head -c 70000 /dev/zero | curl -i -H 'content-type: application/json' --data-binary @- $g/auth/login
  # ... and 413 when it streams without Content-Length
  head -c 70000 /dev/zero | curl -i -H 'content-type: application/json' -H 'transfer-encoding: chunked' --data-binary @- $g/auth/login

  # a content type the route does not accept for POST: 415
  curl -i -H 'content-type: text/xml' -d '<x/>' $g/auth/login

Ctrl-C stops the demo.
TXT
wait -n "${pids[@]}"
