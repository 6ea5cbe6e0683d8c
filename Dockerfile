# mamp: serve a packed checkpoint with the OpenAI-compatible server. No model is baked in: mount one.
#
#   docker build -t mamp .                                   # CUDA (PyTorch + Triton base)
#   docker build --build-arg VARIANT=cpu -t mamp:cpu .       # CPU only: torch from the PyTorch CPU index, no Triton
#   docker run --gpus all -p 8000:8000 -v $PWD/ckpt:/models/ckpt mamp --model /models/ckpt
#   docker run -p 8000:8000 -v $PWD/ckpt:/models/ckpt:ro mamp:cpu --model /models/ckpt --served-model-name my-model
#   docker run --user "$(id -u):$(id -g)" -v $PWD:/out mamp:cpu quantize MODEL --out /out/ckpt --bits 4
#   docker run -v $PWD/ckpt:/models/ckpt -v $PWD/text.txt:/data/text.txt mamp eval /models/ckpt --text /data/text.txt
#
# Build arguments: VARIANT (cuda|cpu), CUDA_IMAGE, CPU_IMAGE (any Debian-family image with Python 3.10+ and pip;
# a Debian-packaged Python also needs python3-dev for the kernel build), TORCH_VERSION and TORCH_INDEX_URL (cpu
# variant; an empty index URL installs torch==TORCH_VERSION from pip's own configuration, e.g. PIP_FIND_LINKS),
# EXTRAS (optional-dependency groups of pyproject.toml, e.g. "smollm2,c4"). pip's own variables (PIP_FIND_LINKS,
# PIP_INDEX_URL, PIP_CERT) pass through as build arguments; docker/ci/image_check.sh builds from a Debian-mirror
# base with the local torch wheel that way, offline from any registry.
ARG VARIANT=cuda
ARG CUDA_IMAGE=pytorch/pytorch:2.10.0-cuda12.8-cudnn9-runtime
ARG CPU_IMAGE=python:3.12-slim-bookworm

# torch and Triton come with the base image. Triton builds a small C launcher for its kernels at run time, so
# the image needs a C compiler ("Failed to find C compiler" otherwise).
FROM ${CUDA_IMAGE} AS base-cuda
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

FROM ${CPU_IMAGE} AS base-cpu
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG PIP_FIND_LINKS
ARG PIP_INDEX_URL
ARG PIP_CERT
# g++ builds the CPU kernels (kernels/*.cpp) when the image is built; installed only if the base lacks it.
# hadolint ignore=DL3008
RUN if ! command -v g++ >/dev/null; then \
        apt-get update && apt-get install -y --no-install-recommends g++ && rm -rf /var/lib/apt/lists/*; \
    fi
# torch/test holds the wheel's own test programs (83 MB), never used by a server. (torch is pinned: hadolint does
# not see the pin through the optional --index-url.)
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "torch==${TORCH_VERSION}" \
    && rm -rf "$(python -c "import importlib.util as u, os; print(os.path.dirname(u.find_spec('torch').origin))")/test"

# Only the stage VARIANT names is built.
# hadolint ignore=DL3006
FROM base-${VARIANT} AS runtime
ARG VARIANT
ARG EXTRAS=""
ARG PIP_FIND_LINKS
ARG PIP_INDEX_URL
ARG PIP_CERT
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONPATH=/app \
    HOME=/home/mamp \
    MAMP_HOST=0.0.0.0 \
    MAMP_PORT=8000 \
    TORCH_EXTENSIONS_DIR=/opt/mamp/torch_extensions
SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# HOME is world-writable (sticky) so the Triton and Hugging Face caches also work under `--user "$(id -u):$(id -g)"`.
RUN groupadd --gid 10001 mamp \
    && useradd --create-home --uid 10001 --gid 10001 --shell /bin/bash mamp \
    && chmod 1777 /home/mamp

# Dependencies before source, so editing the code does not reinstall them. torch and triton stay pinned to
# what the base image ships (its CUDA build), not replaced from PyPI; the CPU variant leaves Triton out (about
# 1 GB it never uses: Triton kernels run on CUDA only).
WORKDIR /app
COPY pyproject.toml docker/requirements.py /tmp/build/
RUN python /tmp/build/requirements.py /tmp/build/pyproject.toml --extras "${EXTRAS}" --keep-installed torch,triton \
        --exclude "$([ "$VARIANT" = cpu ] && echo triton)" > /tmp/build/requirements.txt \
    && pip install --no-cache-dir -r /tmp/build/requirements.txt \
    && rm -rf /tmp/build

# The three folders are the subpackages mamp.kernels, mamp.quantizer, mamp.server (as pyproject.toml maps them).
COPY mamp/ /app/mamp/
COPY kernels/ /app/mamp/kernels/
COPY quantizer/ /app/mamp/quantizer/
COPY server/ /app/mamp/server/
COPY --chmod=0755 docker/entrypoint.sh /usr/local/bin/mamp-entrypoint

# The CPU kernels compiled now, not on the first request: the server loads them at start-up, before /health
# says ready. The cache stays writable (torch's loader takes a lock file there; a CPU with another instruction
# set than the builder's compiles its own build there at start-up).
RUN python -c "from mamp.kernels import cpu_matmul as m; assert m.load_extension() is not None, m.ext_error()" \
    && chmod -R a+rwX /opt/mamp

USER 10001:10001
EXPOSE 8000
# The entrypoint writes the port it serves (MAMP_PORT or a --port given to the server) to /tmp/mamp.port
# ($MAMP_PORT_FILE).
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; f = os.environ.get('MAMP_PORT_FILE', '/tmp/mamp.port'); p = open(f).read().strip() if os.path.exists(f) else os.environ.get('MAMP_PORT', '8000'); urllib.request.urlopen('http://127.0.0.1:%s/health' % p, timeout=4)"]
ENTRYPOINT ["/usr/local/bin/mamp-entrypoint"]
CMD ["--model", "/models/ckpt"]
