#!/bin/sh
# Creates the demo's credit account, "demo" with 20 credits, in the credit service on
# ${CREDIT_URL:-http://127.0.0.1:8081}. `make demo` runs it, and so does the compose demo's
# credit-setup container. A second run adds nothing: the top-up's reference is fixed.
set -eu
url=${CREDIT_URL:-http://127.0.0.1:8081}
auth="authorization: Bearer ${TOLLGATE_CREDIT_ADMIN_TOKEN:-demo-admin-token-not-for-production}"
curl -fsS -o /dev/null -X PUT -H "$auth" "$url/v1/accounts/demo"
curl -fsS -o /dev/null -H "$auth" -H 'content-type: application/json' \
  -d '{"amount": 20, "reference": "demo-start"}' "$url/v1/accounts/demo/credits"
