# lorafleet: one image for the API, the GPU workers and Flower (docker-compose.yml picks the verb).
#
#   docker build -t lorafleet .                      # CUDA 12.8 torch (default)
#   docker build -t lorafleet-cpu --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu .
#
# The CUDA runtime ships inside the torch wheels, so a slim Python base is enough: the host needs
# only the NVIDIA driver (>= 570 for CUDA 12.8) and the NVIDIA Container Toolkit (`gpus` /
# `deploy.resources` in compose).
#
# The engine's numerics are tested with exactly these versions (requirements-dev.txt pins the same
# ones; tests/test_deploy_files.py checks they agree): torch from PyTorch's CUDA 12.8 wheel index
# (which carries the 2.13 builds; cu126 and cu130 are the other CUDA builds of a release), on the
# Python the tests run (3.11). Change them together with requirements-dev.txt, after the tests.
FROM python:3.11-slim

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ARG TORCH_VERSION=2.13.0
ARG TRANSFORMERS_VERSION=5.24.0
ARG PEFT_VERSION=0.21.2
ARG FLOWER_SPEC="==2.2.0"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    LORAFLEET_DATA_DIR=/data \
    LORAFLEET_MODELS_DIR=/models \
    HF_HOME=/data/huggingface

RUN groupadd --system --gid 10001 lorafleet \
    && useradd --system --uid 10001 --gid lorafleet --home-dir /app --no-create-home \
       --shell /usr/sbin/nologin lorafleet \
    && mkdir -p /app /data /models \
    && chown lorafleet:lorafleet /data /models

WORKDIR /app

# torch first and alone: the largest layer (about 2.5 GB with CUDA) and the one that changes least.
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

# Dependencies from pyproject.toml before the source, so code edits do not reinstall them.
# torch is already satisfied above and is not fetched again from PyPI; transformers and peft are
# pinned to the tested versions on top of pyproject's ranges. Flower is not a project dependency
# (it runs only in its own container) but shares this image.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt "torch==${TORCH_VERSION}" \
       "transformers==${TRANSFORMERS_VERSION}" "peft==${PEFT_VERSION}" "flower${FLOWER_SPEC}" \
    && rm /tmp/requirements.txt

COPY . .
RUN pip install --no-deps . \
    && python -c "import api, worker, shared, cli"

# Numeric, so `runAsNonRoot`-style checks can verify it without reading /etc/passwd.
USER 10001:10001
EXPOSE 8000
VOLUME ["/data", "/models"]

# /healthz answers whenever the API serves HTTP (no database round trip): liveness, not readiness.
# The worker and flower services override this check in docker-compose.yml.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]

CMD ["lorafleet", "serve", "--host", "0.0.0.0", "--port", "8000"]
