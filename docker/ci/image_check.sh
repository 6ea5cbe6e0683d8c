#!/usr/bin/env bash
# Build the CPU image with podman from a base made from the Debian mirror and run it for real (issue 15):
# quantize stories260K through the image's entrypoint, serve it on a port given with --port, check /health,
# a completion, a streamed chat and /metrics (docker/ci/smoke.py), and the HEALTHCHECK command; print the times
# and the image size. No registry is needed: the base comes from debootstrap, torch from the local wheel folder
# (pip's find-links), everything else from PyPI. See ../shared/docs/CONTAINERS.md for why each setting.
#
#   docker/ci/image_check.sh [ASSETS]     (ASSETS: ../shared/assets; PYTHON: the venv's python for smoke.py)
set -euo pipefail
cd "$(dirname "$0")/../.."
ASSETS=${1:-../shared/assets}
PYTHON=${PYTHON:-python}
IMAGE=localhost/mamp:cpu-ci
NAME=mamp-ci-$$
PORT=${PORT:-18123}
export CONTAINERS_CONF=$PWD/docker/ci/containers.conf
if ! command -v podman >/dev/null || ! command -v debootstrap >/dev/null; then
  SUDO=""; if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get install -y -qq podman debootstrap runc >/dev/null \
    || { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq podman debootstrap runc >/dev/null; }
fi
WHEELS=$(pip config get global.find-links 2>/dev/null || true)
WHEELS=${WHEELS:-/opt/wheels}
WORK=$(mktemp -d /tmp/mamp-image-check.XXXXXX)
chmod 0777 "$WORK"
cleanup() { podman rm -f "$NAME" >/dev/null 2>&1 || true; rm -rf "$WORK"; }
trap cleanup EXIT

t0=$SECONDS
docker/ci/base_image.sh local/debian-python:bookworm
t1=$SECONDS
podman build --format docker --network host -v "$WHEELS:/wheels:ro" \
  --build-arg VARIANT=cpu --build-arg CPU_IMAGE=local/debian-python:bookworm \
  --build-arg TORCH_INDEX_URL= --build-arg TORCH_VERSION=2.13.0 --build-arg PIP_FIND_LINKS=/wheels \
  --build-arg PIP_CERT=/etc/ssl/certs/ca-certificates.crt -t "$IMAGE" . >"$WORK/build.log" 2>&1 \
  || { tail -40 "$WORK/build.log"; exit 1; }
t2=$SECONDS
size=$(podman image inspect --format '{{.Size}}' "$IMAGE")
echo "image $IMAGE: $((size / 1000000)) MB; base $((t1 - t0)) s, build $((t2 - t1)) s"

# quantize through the entrypoint, as the image's own user (10001) writing to a mounted folder
cp "$ASSETS/wikitext-2/valid.txt" "$WORK/calib.txt"
podman run --rm --network host -v "$ASSETS/models/stories260K:/in:ro" -v "$WORK:/out" "$IMAGE" \
  quantize /in --out /out/ckpt --bits 4 --calib /out/calib.txt --nsamples 8 --seqlen 128 >"$WORK/quant.log" 2>&1 \
  || { tail -20 "$WORK/quant.log"; exit 1; }
echo "ok: quantize through the entrypoint ($(grep -c . "$WORK/quant.log") log lines, $((SECONDS - t2)) s)"

# serve on a port given with --port only: the HEALTHCHECK must follow it
podman run -d --name "$NAME" --network host -v "$WORK/ckpt:/models/ckpt:ro" "$IMAGE" \
  --model /models/ckpt --port "$PORT" --served-model-name stories >/dev/null
if ! "$PYTHON" docker/ci/smoke.py "http://127.0.0.1:$PORT" stories; then
  podman logs "$NAME" 2>&1 | tail -30
  exit 1
fi
podman healthcheck run "$NAME" && echo "ok: HEALTHCHECK passes on port $PORT"

# A real Prometheus (Debian's package, on the host) scrapes the container; the weight saving read back through
# its HTTP API, as the Grafana dashboard reads it.
if command -v prometheus >/dev/null; then
  PROM_PORT=$((PORT + 1))
  cat >"$WORK/prometheus.yml" <<YAML
global: {scrape_interval: 1s}
scrape_configs:
  - job_name: mamp
    static_configs: [{targets: ["127.0.0.1:$PORT"]}]
YAML
  prometheus --config.file="$WORK/prometheus.yml" --storage.tsdb.path="$WORK/prom" \
    --web.listen-address="127.0.0.1:$PROM_PORT" >"$WORK/prom.log" 2>&1 &
  PROM_PID=$!
  trap 'kill $PROM_PID 2>/dev/null || true; cleanup' EXIT
  "$PYTHON" - "$PROM_PORT" <<'PY' || { tail -20 "$WORK/prom.log"; exit 1; }
import sys, time, httpx
url = f"http://127.0.0.1:{sys.argv[1]}/api/v1/query"
deadline = time.monotonic() + 90
while time.monotonic() < deadline:
    try:
        result = httpx.get(url, params={"query": "mamp:weight_memory_saving_ratio"}, timeout=5).json()["data"]["result"]
        if result:
            print(f"ok: Prometheus scraped the container: weight saving ratio {float(result[0]['value'][1]):.3f} "
                  f"({result[0]['metric'].get('model_name')})")
            sys.exit(0)
    except (httpx.HTTPError, KeyError, ValueError):
        pass
    time.sleep(1)
sys.exit("FAIL: Prometheus has no mamp:weight_memory_saving_ratio after 90 s")
PY
else
  echo "Prometheus step skipped: no prometheus binary (Debian package prometheus)"
fi
echo "image check done in $((SECONDS - t0)) s"
