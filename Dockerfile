# syntax=docker/dockerfile:1.7
# magistream server image. Two variants from one file:
#   docker build -t magistream:gpu .                       # CUDA base, torch cu128 build
#   docker build -t magistream:cpu --build-arg VARIANT=cpu .   # Debian 12, torch CPU build
# Run: docker run --gpus all -p 50051:50051 -p 9400:9400 \
#        -v /srv/models/4.5B_distill:/models/4.5B_distill:ro magistream:gpu \
#        --model /models/4.5B_distill
# A real model is never in the image and never downloaded: mount its folder under /models (the
# folder's name is the model's name). With no --model the server runs the embedded `toy` world
# model (models/toy, ~30 MB, part of the source). See docs/deploy.md.

ARG VARIANT=gpu
# "-base" (cudart and the NVIDIA container settings) rather than "-runtime": torch's cu128
# wheels bring their own cuBLAS/cuDNN/NCCL, so -runtime's copies would be 2+ GB unused.
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-base-ubuntu24.04
ARG CPU_IMAGE=debian:12.11-slim
ARG UV_IMAGE=ghcr.io/astral-sh/uv:0.8.14

FROM ${UV_IMAGE} AS uv

FROM ${CUDA_IMAGE} AS base-gpu
ENV TORCH_INDEX=https://download.pytorch.org/whl/cu128

FROM ${CPU_IMAGE} AS base-cpu
# PyPI's Linux torch wheel is the CUDA one; the CPU index keeps 3 GB of CUDA libraries out.
ENV TORCH_INDEX=https://download.pytorch.org/whl/cpu

# One CPython for both variants (the CUDA base is Ubuntu, whose python3 is 3.12; everything is
# tested on 3.11): a standalone build that needs no system libraries.
# DL3006 ignored: base-${VARIANT} is one of the two stages above, not an image to tag.
# hadolint ignore=DL3006
FROM base-${VARIANT} AS python
ARG PYTHON_VERSION=3.11.13
ENV UV_PYTHON_INSTALL_DIR=/opt/python UV_PYTHON_BIN_DIR=/opt/python/bin
RUN --mount=from=uv,source=/uv,target=/usr/local/bin/uv \
    uv python install "${PYTHON_VERSION}" \
    && ln -s /opt/python/cpython-"${PYTHON_VERSION}"-linux-*/bin/python3.11 /usr/local/bin/python3.11 \
    && python3.11 --version

FROM python AS build
# Only make: `make install` is the single source of truth for what goes into the venv.
# Debian/Ubuntu package versions are not pinned (DL3008): the base image tag pins the release
# and a pinned .deb version disappears from the archive at its next security update.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends make ca-certificates \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/magistream
COPY . .
# `-o system-deps`: skip the target that apt-installs ffmpeg/prometheus for the test suite;
# the server itself needs neither (PyAV bundles its FFmpeg).
RUN --mount=type=cache,target=/root/.cache/pip \
    make -o system-deps install VENV=/opt/venv PYTHON=python3.11 TORCH_INDEX="${TORCH_INDEX}"

FROM python AS runtime
# Fixed ids: the Kubernetes manifests run as 10001:10001 (runAsUser / runAsGroup).
RUN groupadd --system --gid 10001 magistream \
    && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/magistream \
    --shell /usr/sbin/nologin magistream
COPY --from=build /opt/venv /opt/venv
# The source stays at the path it was installed from (the project is an editable install).
COPY --from=build /opt/magistream /opt/magistream
ENV PATH=/opt/venv/bin:${PATH} \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    MAGISTREAM_CACHE=/home/magistream/.cache/magistream \
    MAGISTREAM_PORT=50051 \
    MAGISTREAM_METRICS_PORT=9400
WORKDIR /opt/magistream
USER 10001:10001
# gRPC (VideoGeneration, grpc.health.v1, reflection) and Prometheus /metrics.
EXPOSE 50051 9400
# grpc.health.v1 Check on the local port; SERVING only once the model is loaded, so the start
# period covers loading a large model. Kubernetes ignores this and uses its own gRPC probes.
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python", "deploy/healthcheck.py"]
# magi-server (`python -m server`, a console script of the editable install): SIGTERM drains
# (health NOT_SERVING, running sessions get --grace-period-s, then exit 0).
ENTRYPOINT ["magi-server"]
