# yolodex images. Two targets; docker/compose.yaml builds both and runs app, worker, labelstudio, redis, postgres.
#   docker build -t yolodex .                                    the app image (also the worker's), CPU torch
#   docker build --target labelstudio -t yolodex-labelstudio .   Label Studio, in its own venv (no torch)
#   docker run -p 127.0.0.1:8501:8501 -v yolodex-storage:/data yolodex
#
# GPU (CUDA) image: the same base with torch's CUDA build, whose wheels carry the CUDA runtime and cuDNN (the
# nvidia-* packages); the host's driver comes in through the NVIDIA Container Toolkit (`docker run --gpus all`):
#   docker build --build-arg TORCH_VARIANT=cu126 -t yolodex:cuda .
# TORCH_VARIANT names a folder of https://download.pytorch.org/whl/ that holds the torch pinned in requirements.txt
# (cpu, cu126, cu128, ...); TORCH_INDEX_URL= (empty) takes torch from PyPI instead (on Linux: a CUDA build).
# BASE_IMAGE may name another image with Python 3.11 and apt-get (the pins are for Python 3.11), e.g. a CUDA one.
#
# The install and start steps are docker/install.sh and docker/start.sh, which tests/test_containers.py also runs
# outside Docker.
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHON=python3 \
    YOLODEX_SOURCE=/app \
    YOLODEX_VENV=/opt/yolodex/venv \
    YOLODEX_LS_VENV=/opt/yolodex/venv-labelstudio \
    YOLODEX_STORAGE=/data \
    YOLODEX_HOST=0.0.0.0 \
    YOLODEX_APP_PORT=8501 \
    YOLODEX_LS_PORT=8080
# Inside a container the servers listen on 0.0.0.0 (127.0.0.1 would be the container's own loopback); publish
# the ports on the host's loopback (-p 127.0.0.1:8501:8501) to keep them off the network.
# One unprivileged user for every process; /data is the storage volume (images, datasets, runs, the SQLite
# files when no database server is set, Label Studio's credentials file).
RUN useradd --create-home --uid 1000 --user-group yolodex \
    && mkdir -p /data /opt/yolodex \
    && chown yolodex:yolodex /data
WORKDIR /app

# ---------------------------------------------------------------------------------------------- Label Studio
FROM base AS labelstudio
COPY requirements-labelstudio.txt /app/
COPY docker/install.sh /app/docker/
RUN /app/docker/install.sh labelstudio
# backend/labeling/server.py (standard library only) starts Label Studio, with the admin login it keeps in
# /data/labelstudio/credentials.json (0600) for the app and the worker, which share the volume.
COPY pyproject.toml /app/
COPY backend /app/backend
COPY docker /app/docker
USER 1000:1000
VOLUME ["/data"]
EXPOSE 8080
# The first start runs every migration (about two minutes).
HEALTHCHECK --interval=30s --timeout=10s --start-period=300s --retries=3 CMD ["/app/docker/start.sh", "health", "labelstudio"]
ENTRYPOINT ["/app/docker/start.sh"]
CMD ["labelstudio"]

# ---------------------------------------------------------------------------------------------- app and worker
FROM base AS app
ARG TORCH_VARIANT=cpu
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/${TORCH_VARIANT}
# libgomp1: the OpenMP runtime onnxruntime and opencv load, absent from slim images.
RUN apt-get update \
    && apt-get install --yes --no-install-recommends libgomp1 \
    && rm -rf /var/lib/apt/lists/*
# The packages first, so a code change does not reinstall them.
COPY requirements.txt /app/
COPY docker/install.sh /app/docker/
RUN /app/docker/install.sh requirements
COPY pyproject.toml README.md /app/
COPY backend /app/backend
COPY app /app/app
COPY .streamlit /app/.streamlit
COPY pages /app/pages
COPY docker /app/docker
RUN /app/docker/install.sh yolodex
ENV PATH=/opt/yolodex/venv/bin:$PATH
USER 1000:1000
VOLUME ["/data"]
EXPOSE 8501
HEALTHCHECK --interval=30s --timeout=10s --start-period=120s --retries=3 CMD ["/app/docker/start.sh", "health", "app"]
# start.sh app|worker|starter|yolodex ARGS...: the compose file picks the role per service.
ENTRYPOINT ["/app/docker/start.sh"]
CMD ["app"]
