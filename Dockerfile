# syntax=docker/dockerfile:1.7
# magistream server image: Debian 12's own Python 3.11, the project installed by `make install`
# (the pins of requirements.txt), on any Debian 12 (bookworm) base given by BASE_IMAGE.
#   docker build -t magistream:gpu .                                  # torch cu128 (default)
#   docker build -t magistream:cpu \
#       --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu .  # torch CPU build
#   make image   # here, with no registry: a debootstrap base, buildah, a smoke test
# The GPU image needs no NVIDIA base image: torch's CUDA wheels bring the CUDA libraries as
# Python packages, and the container runtime (NVIDIA Container Toolkit) mounts the host's
# driver. Run: docker run --gpus all -p 50051:50051 -p 9400:9400 \
#        -v /srv/models/4.5B_distill:/models/4.5B_distill:ro magistream:gpu \
#        --model /models/4.5B_distill
# A real model is never in the image and never downloaded: mount its folder under /models (the
# folder's name is the model's name). With no --model the server runs the embedded `toy` world
# model (models/toy, ~30 MB, part of the source). See docs/deploy.md.

# debian:12.11-slim from a registry, or `make image`'s localhost/magistream-base:bookworm
ARG BASE_IMAGE=debian:12.11-slim

# DL3006 ignored: the base is a build argument (a tag or digest is the caller's choice).
# hadolint ignore=DL3006
FROM ${BASE_IMAGE} AS python
# Debian's CPython 3.11 (bookworm's python3; everything is tested on it), and make.
# Debian package versions are not pinned (DL3008): the base image pins the release and a pinned
# .deb version disappears from the archive at its next security update.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv make ca-certificates \
    && rm -rf /var/lib/apt/lists/*

FROM python AS build
# Where pip takes torch from: the CUDA 12.8 build by default; .../whl/cpu for the CPU build;
# empty to take it from the indexes pip already knows. `make image` installs offline from a
# mounted wheel folder: PIP_FIND_LINKS=/wheels, PIP_NO_INDEX=1.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
ARG PIP_FIND_LINKS=
ARG PIP_NO_INDEX=
WORKDIR /opt/magistream
COPY . .
# `-o system-deps`: skip the target that apt-installs the test suite's tools (ffmpeg,
# prometheus, nginx, chromium); the server needs none of them (PyAV bundles its FFmpeg).
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
