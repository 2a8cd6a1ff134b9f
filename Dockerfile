# yolodex app image. CPU by default:
#   docker build -t yolodex .
#   docker run -p 8501:8501 -v yolodex-storage:/data yolodex
# For a GPU image, choose a base that has Python 3.11 and CUDA, and take torch's CUDA build from PyPI:
#   docker build --build-arg BASE_IMAGE=<a CUDA + Python 3.11 image> --build-arg TORCH_INDEX_URL= -t yolodex:cuda .
#   docker run --gpus all -p 8501:8501 -v yolodex-storage:/data yolodex:cuda
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

# Where torch comes from. PyPI's default torch wheel for Linux is the CUDA build (several GB); the CPU index
# keeps the CPU image small. Empty: take torch from PyPI like everything else (the GPU image).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    YOLODEX_STORAGE=/data \
    YOLODEX_HOST=0.0.0.0 \
    YOLODEX_APP_PORT=8501

# libgomp: OpenMP runtime used by onnxruntime and opencv on slim images.
RUN apt-get update \
    && apt-get install --yes --no-install-recommends libgomp1 \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app

# Dependencies first, so editing the code does not reinstall them.
COPY requirements.txt ./
RUN if [ -n "$TORCH_INDEX_URL" ]; then \
        pip install --index-url "$TORCH_INDEX_URL" "$(grep -E '^torch==' requirements.txt)"; \
    fi \
    && pip install -r requirements.txt

COPY . .
# Not editable: the package is copied into site-packages, so YOLODEX_STORAGE above is what locates storage.
RUN pip install --no-deps . \
    && useradd --create-home --uid 1000 yolodex \
    && mkdir -p /data \
    && chown yolodex:yolodex /data

USER yolodex
VOLUME ["/data"]
EXPOSE 8501

HEALTHCHECK --interval=30s --timeout=5s --start-period=60s \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8501/_stcore/health', timeout=4)"

# Inside a container the server must listen on 0.0.0.0: 127.0.0.1 would be the container's own loopback,
# unreachable through `docker run -p`. Publish the port on the host's loopback (-p 127.0.0.1:8501:8501)
# when the app should not be reachable from the network.
CMD ["streamlit", "run", "app/main.py", "--server.address", "0.0.0.0", "--server.port", "8501", \
     "--server.headless", "true", "--browser.gatherUsageStats", "false"]
