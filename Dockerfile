# syntax=docker/dockerfile:1
# mamp: serve a packed checkpoint with the OpenAI-compatible server. No model is baked in: mount one.
#
#   docker build -t mamp .                                   # CUDA (PyTorch + Triton base)
#   docker build --build-arg VARIANT=cpu -t mamp:cpu .       # CPU only (torch from the PyTorch CPU index)
#   docker run --gpus all -p 8000:8000 -v $PWD/ckpt:/models/ckpt mamp --model /models/ckpt
#   docker run --gpus all --user "$(id -u):$(id -g)" -v $PWD:/out mamp quantize MODEL --out /out/ckpt --bits 4
#   docker run -v $PWD/ckpt:/models/ckpt -v $PWD/text.txt:/data/text.txt mamp eval /models/ckpt --text /data/text.txt
#
# Build arguments: VARIANT (cuda|cpu), CUDA_IMAGE, CPU_IMAGE, TORCH_VERSION (cpu variant),
# EXTRAS (optional-dependency groups of pyproject.toml, e.g. "smollm2,c4").
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
ARG TORCH_VERSION=2.10.0
# g++ builds the CPU packed-matmul extension (kernels/cpu_matmul.cpp) on first use.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ \
    && rm -rf /var/lib/apt/lists/*
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu "torch==${TORCH_VERSION}"

# Only the stage VARIANT names is built.
# hadolint ignore=DL3006
FROM base-${VARIANT} AS runtime
ARG EXTRAS=""
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONPATH=/app \
    HOME=/home/mamp \
    MAMP_HOST=0.0.0.0 \
    MAMP_PORT=8000
SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# HOME is world-writable (sticky) so the Triton and Hugging Face caches also work under `--user "$(id -u):$(id -g)"`.
RUN groupadd --gid 10001 mamp \
    && useradd --create-home --uid 10001 --gid 10001 --shell /bin/bash mamp \
    && chmod 1777 /home/mamp

# Dependencies before source, so editing the code does not reinstall them. torch and triton stay pinned to
# what the base image ships (its CUDA build), not replaced from PyPI.
WORKDIR /app
COPY pyproject.toml docker/requirements.py /tmp/build/
RUN python /tmp/build/requirements.py /tmp/build/pyproject.toml --extras "${EXTRAS}" --keep-installed torch,triton \
        > /tmp/build/requirements.txt \
    && pip install --no-cache-dir -r /tmp/build/requirements.txt \
    && rm -rf /tmp/build

# The three folders are the subpackages mamp.kernels, mamp.quantizer, mamp.server (as pyproject.toml maps them).
COPY mamp/ /app/mamp/
COPY kernels/ /app/mamp/kernels/
COPY quantizer/ /app/mamp/quantizer/
COPY server/ /app/mamp/server/
COPY --chmod=0755 docker/entrypoint.sh /usr/local/bin/mamp-entrypoint

USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('MAMP_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["/usr/local/bin/mamp-entrypoint"]
CMD ["--model", "/models/ckpt"]
