#!/usr/bin/env bash
# Container entrypoint: `IMAGE --model /models/ckpt ...` serves, `IMAGE quantize MODEL --out DIR ...` quantizes,
# `IMAGE eval CKPT --text FILE` evaluates; any other command (bash, python ...) runs as given.
set -euo pipefail

case "${1:-}" in
  quantize) shift; exec python -m mamp.quantizer "$@" ;;
  eval) shift; exec python -m mamp.quantizer.eval "$@" ;;
  serve) shift ;;
  "" | -*) ;;
  *) exec "$@" ;;
esac

# argparse keeps the last value of a repeated flag, so these defaults yield to a --host/--port given after them.
# The port served (the last --port given, else MAMP_PORT) goes to /tmp/mamp.port, which the HEALTHCHECK probes.
port="${MAMP_PORT:-8000}"
prev=""
for arg in "$@"; do
  case "$arg" in
    --port=*) port="${arg#--port=}" ;;
    *) if [ "$prev" = "--port" ]; then port="$arg"; fi ;;
  esac
  prev="$arg"
done
echo "$port" > "${MAMP_PORT_FILE:-/tmp/mamp.port}" 2>/dev/null || true
exec python -m mamp.server --host "${MAMP_HOST:-0.0.0.0}" --port "${MAMP_PORT:-8000}" "$@"
