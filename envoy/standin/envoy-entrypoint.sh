#!/bin/sh
# The Envoy stand-in's entrypoint, doing what the official image's docker-entrypoint.sh does for the
# compose demo: arguments that begin with "-" are Envoy's, and Envoy runs as uid 101, not root.
set -e
if [ "${1#-}" != "$1" ]; then
  set -- envoy "$@"
fi
if [ "$(id -u)" = 0 ]; then
  exec setpriv --reuid=101 --regid=101 --clear-groups "$@"
fi
exec "$@"
