# syntax=docker/dockerfile:1
# The image behind `docker run observe-r1 train|sft|serve|ask|eval|chat|demo|...` (README: Deploy).
#
#   docker build -t observe-r1 .                                  GPU: the official vLLM wheel on CUDA torch
#   docker build --build-arg VARIANT=cpu -t observe-r1:cpu .      CPU: the transformers engine, no vLLM
#
# Every environment installs from its hashed lock in locks/ (scripts/locks.py); nothing is resolved here.
# The main environment is /opt/venv (locks/main-cuda.lock.txt, or locks/image-cpu.lock.txt for the CPU
# variant); lmms-eval lives apart in /opt/venv-eval (locks/image-eval.lock.txt), as on a laptop, because it
# pins packages the main environment cannot take. tests/test_deploy.py checks this file's installs.

ARG VARIANT=gpu
# CUDA 13.0 is what the locked torch (2.13.0) is built for; torch brings its own CUDA libraries as wheels,
# so the base needs only the driver's compatibility layer and the NVIDIA runtime's settings.
ARG CUDA_BASE=nvidia/cuda:13.0.2-base-ubuntu24.04
ARG CPU_BASE=ubuntu:24.04
# The locks are resolved for CPython 3.11.
ARG PYTHON_VERSION=3.11.14

# The build stage has a compiler and Python headers for the few packages that ship only sources
# (DeepSpeed among them); none of it reaches the runtime.
FROM python:${PYTHON_VERSION}-bookworm AS build
ARG VARIANT
ARG PYTHON_VERSION
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV UV_PYTHON_INSTALL_DIR=/opt/python \
    UV_PYTHON_PREFERENCE=only-managed \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=hardlink \
    UV_CACHE_DIR=/tmp/uv-cache \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY locks/ locks/
# uv itself from its hashed lock; then a standalone CPython (uv pins each build's checksum) at a path the
# runtime stages share, since a virtual environment points at its interpreter by path.
RUN python -m pip install --no-cache-dir --require-hashes --no-deps -r locks/tools.lock.txt \
    && uv python install "$PYTHON_VERSION"
# Both environments in one step from one uv cache, hard-linked: torch and the CUDA libraries they share
# (the locks pin them alike, tests/test_locks.py) are stored once. Only a lock change reruns this.
RUN case "$VARIANT" in \
        gpu) main_lock=locks/main-cuda.lock.txt ;; \
        cpu) main_lock=locks/image-cpu.lock.txt ;; \
        *) echo "VARIANT must be gpu or cpu, not '$VARIANT'" >&2; exit 1 ;; \
    esac \
    && uv venv --python "$PYTHON_VERSION" /opt/venv \
    && uv venv --python "$PYTHON_VERSION" /opt/venv-eval \
    && uv pip sync --python /opt/venv/bin/python --require-hashes \
        --build-constraints locks/build.lock.txt "$main_lock" \
    && uv pip sync --python /opt/venv-eval/bin/python --require-hashes \
        --build-constraints locks/build.lock.txt locks/image-eval.lock.txt \
    && rm -rf "$UV_CACHE_DIR"
# The project last, without dependencies (they are all above), in both environments: lmms-eval loads
# the project's model and task code through entry points.
COPY pyproject.toml README.md ./
COPY observe_r1/ observe_r1/
COPY train/ train/
COPY serve/ serve/
COPY eval/ eval/
RUN for venv in /opt/venv /opt/venv-eval; do \
        uv pip install --python "$venv/bin/python" --no-deps --build-constraints locks/build.lock.txt . ; \
    done \
    && rm -rf "$UV_CACHE_DIR"

FROM ${CUDA_BASE} AS runtime-gpu
FROM ${CPU_BASE} AS runtime-cpu

# DL3006 (untagged image): this names one of the two stages above, each on a pinned tag.
# hadolint ignore=DL3006
FROM runtime-${VARIANT}
ARG VARIANT
LABEL org.opencontainers.image.title="observe-r1" \
      org.opencontainers.image.description="Train, serve and evaluate multimodal reasoning models in the Observe-R1 style" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.variant="${VARIANT}"
# ca-certificates: model downloads over HTTPS; gcc and libc6-dev: Triton compiles its kernel launchers
# with the system C compiler at run time. DL3008 (unpinned apt packages): Ubuntu's archive drops superseded
# versions, so exact pins would break the build within weeks; the base tag fixes the release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
# A fixed UID in group 0, and group 0 may write wherever the user may: the image also runs under the
# arbitrary UIDs (always in group 0) that OpenShift assigns.
ENV HOME=/home/observe \
    HF_HOME=/data/huggingface \
    XDG_CACHE_HOME=/home/observe/.cache \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    OBSERVE_R1_LMMS_PYTHON=/opt/venv-eval/bin/python
RUN useradd --uid 10001 --gid 0 --no-create-home --home-dir "$HOME" --shell /usr/sbin/nologin observe \
    && mkdir -p "$HOME/.cache" "$HF_HOME" /workspace \
    && chown -R 10001:0 "$HOME" /data /workspace \
    && chmod -R g=u "$HOME" /data /workspace
# One COPY, so that the hard links between the two environments survive into one layer.
COPY --from=build /opt /opt
USER 10001
WORKDIR /workspace
VOLUME ["/data"]
EXPOSE 8000
# Probes the server's /health only when this container runs `serve`; any other command (train, eval,
# ...) is reported healthy, so a training container is never marked unhealthy for having no server.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10m --retries=3 \
    CMD ["python", "-m", "observe_r1_serve.healthcheck"]
ENTRYPOINT ["observe-r1"]
CMD ["--help"]
