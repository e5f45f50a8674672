# syntax=docker/dockerfile:1
#
# annoloop: one image, three services (docker-compose.yml runs all three from it):
#   annoloop serve --host 0.0.0.0 --port 9090   the ML backend Label Studio talks to (the default command)
#   annoloop worker                             the RQ worker that retrains and re-syncs (GPU when given one)
#   annoloop sync --all --every 10m             the scheduled ordering of Label Studio's queues
# Any other subcommand runs the same way: `docker compose run --rm backend starter-model`.
#
# GPU: torch and torchvision are the CUDA builds from PyPI that uv.lock pins. Their nvidia-* wheels bundle the
# CUDA runtime libraries (cuDNN, cuBLAS, NCCL, ...), so no CUDA base image is needed: on a host with the NVIDIA
# driver and the NVIDIA Container Toolkit, a container that is given a GPU (compose: the worker's device
# reservation; `docker run --gpus 1`) gets the driver mounted in and torch uses it. Without a GPU the same image
# runs on the CPU. The locked torch is built for CUDA 13, which needs a host driver of version 580 or newer.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

############################################################################ builder: the locked venv
FROM ${PYTHON_IMAGE} AS builder

# The uv release the Makefile bootstraps (UV_VERSION there), so the lock is read the same way.
ARG UV_VERSION=0.13.8
RUN pip install --no-cache-dir "uv==${UV_VERSION}"

# Install into /opt/venv with the image's own interpreter (never a downloaded one: the runtime stage has the
# same /usr/local/bin/python3.11, and the venv points at it), compiled to bytecode for faster starts.
ENV UV_PROJECT_ENVIRONMENT=/opt/venv \
    UV_PYTHON=/usr/local/bin/python3.11 \
    UV_PYTHON_DOWNLOADS=never \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy

WORKDIR /src

# Dependencies first, exactly as locked (--frozen) and without the dev group: this layer (several GB, mostly
# torch and the CUDA libraries) is rebuilt only when pyproject.toml or uv.lock change.
COPY pyproject.toml uv.lock README.md ./
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --frozen --no-dev --no-install-project

# Then annoloop itself, as a regular (not editable) install: the runtime stage needs nothing but /opt/venv.
COPY annoloop/ annoloop/
COPY ml_backend/ ml_backend/
COPY training/ training/
COPY sync/ sync/
COPY config/ config/
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --frozen --no-dev --no-editable \
    && /opt/venv/bin/annoloop --help > /dev/null \
    && /opt/venv/bin/python -c "from config.settings import load_settings; load_settings(env={})"

############################################################################ runtime
FROM ${PYTHON_IMAGE} AS runtime

# An unprivileged user with a fixed uid/gid: the models volume is created owned by it (Docker copies the
# ownership of /data/models into an empty named volume), and a bind mount can be chowned to 10001.
RUN groupadd --system --gid 10001 annoloop \
    && useradd --system --uid 10001 --gid annoloop --home-dir /home/annoloop --create-home \
        --shell /usr/sbin/nologin annoloop \
    && mkdir -p /data/models /app \
    && chown annoloop:annoloop /data/models /app

COPY --from=builder /opt/venv /opt/venv
COPY docker/healthcheck.py /app/docker/healthcheck.py

# YOLO_OFFLINE: ultralytics never downloads at run time (weights, fonts, its AMP self-check); annoloop's models
# are built from YAML or read from MODEL_DIR. YOLO_CONFIG_DIR and MPLCONFIGDIR: the settings and caches
# ultralytics and matplotlib write go to the user's (writable) home, not a read-only or shared place.
# NVIDIA_DRIVER_CAPABILITIES: what the NVIDIA Container Toolkit mounts into a container given a GPU: the CUDA
# driver (compute) and nvidia-smi / NVML (utility), which the worker uses to name the GPU it found.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MODEL_DIR=/data/models \
    YOLO_OFFLINE=1 \
    YOLO_CONFIG_DIR=/home/annoloop/.config \
    MPLCONFIGDIR=/home/annoloop/.config/matplotlib \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

# Numeric, so that runtimes which insist on a non-root user (Kubernetes runAsNonRoot) can verify it.
USER 10001:10001
WORKDIR /app

EXPOSE 9090

# For `serve`: /health answers 200 {"status": "UP"} (with basic auth when it is on). python, not curl: the slim
# image has no curl. The first start imports torch and loads the served models, hence the start period.
# docker-compose.yml gives the worker its own check (its registration in Redis) and turns it off for sync.
HEALTHCHECK --interval=30s --timeout=10s --start-period=120s --retries=3 \
    CMD ["python", "/app/docker/healthcheck.py", "serve", "9090"]

ENTRYPOINT ["annoloop"]
CMD ["serve", "--host", "0.0.0.0", "--port", "9090"]
