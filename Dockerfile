# genloop server image. CPU by default; CUDA with --build-arg VARIANT=cuda.
#
#   docker build -t genloop .                          # CPU (torch 2.13.0 CPU build)
#   docker build -t genloop:cuda --build-arg VARIANT=cuda .
#   docker run -p 8000:8000 -v genloop-data:/data genloop
#
#   docker run -p 8000:8000 -v genloop-data:/data -v $PWD/my-model:/models/model:ro \
#     -e GENLOOP_MODEL_DIR=/models/model genloop
#
# The container runs `genloop entrypoint` on 0.0.0.0:8000 (inside the container; publish
# the port deliberately), as an unprivileged user, with the workspace on the /data volume:
# it migrates the catalog (safe when replicas start at once), imports the checkpoint
# mounted at $GENLOOP_MODEL_DIR once, serves it and the refs in $GENLOOP_MODELS, and shares
# rate limits through $GENLOOP_REDIS_URL. /health (liveness) and /ready (readiness) need
# no key. Keys are created with `docker run --rm -v genloop-data:/data genloop keys create ...`.
ARG VARIANT=cpu

FROM python:3.11-slim AS base-cpu
ENV TORCH_INDEX=https://download.pytorch.org/whl/cpu

FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 AS base-cuda
# the distribution's python3.11, whichever patch release the pinned base image carries
# hadolint ignore=DL3008
RUN apt-get update && apt-get install -y --no-install-recommends python3.11 python3.11-venv \
    && rm -rf /var/lib/apt/lists/* && ln -sf /usr/bin/python3.11 /usr/local/bin/python
ENV TORCH_INDEX=https://download.pytorch.org/whl/cu128

# a stage of this file (base-cpu or base-cuda), not an image to tag
# hadolint ignore=DL3006
FROM base-${VARIANT} AS runtime
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 VIRTUAL_ENV=/opt/genloop \
    PATH=/opt/genloop/bin:$PATH GENLOOP_HOME=/data
RUN python -m venv /opt/genloop
WORKDIR /src
COPY constraints.txt pyproject.toml setup.py README.md ./
COPY src ./src
RUN pip install --no-cache-dir --index-url "$TORCH_INDEX" torch==2.13.0 \
    && pip install --no-cache-dir . \
    && rm -rf /src
RUN useradd --system --uid 10001 --home-dir /data genloop && mkdir -p /data \
    && chown genloop /data
# numeric, so Kubernetes' runAsNonRoot can check it
USER 10001
WORKDIR /data
VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
ENTRYPOINT ["genloop"]
CMD ["entrypoint", "--host", "0.0.0.0", "--port", "8000"]
