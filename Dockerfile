# One image for every LGFF pipeline stage (prep, train, embed, index, evaluate, report) and for `lgff` by hand.
#
#   docker build -t ghcr.io/lgff/lgff:0.1.0 .                                   # CPU torch wheels from PyPI indexes
#   docker build --build-arg VARIANT=cuda -t ghcr.io/lgff/lgff:0.1.0-cuda .     # CUDA torch wheels (pipeline.gpu_image)
#   make image                                  # offline: base image from Debian packages, wheels from a wheelhouse
#
# Build arguments:
#   BASE_IMAGE    any Debian-like image with python3 >= 3.10 and python3-venv (default: the official slim Python image;
#                 `make base-image` builds lgff-base:bookworm from Debian packages where no registry is reachable)
#   WHEELHOUSE    directory in the build context; when it holds wheels, every Python package is installed from it with
#                 `pip install --no-index` (no network needed: `make wheelhouse` fills it); empty -> indexes below
#   PIP_INDEX_URL Python package index for the non-torch packages when WHEELHOUSE has no wheels
#   VARIANT       cpu | cuda: which torch index (TORCH_INDEX_CPU / TORCH_INDEX_CUDA) torch comes from without a wheelhouse
#   BAKE_WEIGHTS  presets whose timm hub weights are fetched during the build (needs internet); `make image
#                 BAKE_WEIGHTS=...` instead fetches them on the build host into weights/, which is always copied in
#
# Run time: nothing is pip-installed or downloaded when a task starts (kfp components use install_kfp_package=False).
# Backbone weights come from /opt/lgff/weights (LGFF_WEIGHTS_DIR, files <timm name>.safetensors) or an object-store
# URI in model.backbone.weights; HF_HUB_OFFLINE=1 keeps timm off the hub. The image runs as uid 1000 with a read-only
# root filesystem: every writable path (HOME, caches, matplotlib config) lies under /tmp, mount a tmpfs there.
ARG BASE_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------------------------------------------------- deps
FROM ${BASE_IMAGE} AS deps
ARG VARIANT=cpu
ARG WHEELHOUSE=wheelhouse
ARG PIP_INDEX_URL=https://pypi.org/simple
ARG TORCH_INDEX_CPU=https://download.pytorch.org/whl/cpu
ARG TORCH_INDEX_CUDA=https://download.pytorch.org/whl/cu124
ARG SAMPLE_PKGS="histolytics==0.3.0 stardist==0.9.2"
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1

# libgomp1 (torch / faiss OpenMP) and CA certificates: already in lgff-base, installed from apt in the official image
RUN if ! ldconfig -p | grep -q 'libgomp.so.1' || [ ! -d /etc/ssl/certs ]; then \
        apt-get update && apt-get install -y --no-install-recommends libgomp1 ca-certificates \
        && rm -rf /var/lib/apt/lists/*; fi \
 && python3 -m venv /opt/lgff/venv
ENV PATH=/opt/lgff/venv/bin:$PATH

# the project's metadata only (no sources): this layer is rebuilt only when dependencies change
COPY pyproject.toml README.md /opt/lgff/meta/
COPY ${WHEELHOUSE}/ /tmp/wheelhouse/
RUN set -e; cd /tmp; \
    if ls /tmp/wheelhouse/*.whl >/dev/null 2>&1; then \
        src="--no-index --find-links /tmp/wheelhouse"; \
    else \
        if [ "$VARIANT" = "cuda" ]; then idx="$TORCH_INDEX_CUDA"; else idx="$TORCH_INDEX_CPU"; fi; \
        python -m pip install --index-url "$idx" "torch>=2.2" "torchvision>=0.17"; \
        src="--index-url $PIP_INDEX_URL"; \
    fi; \
    python -m pip install $src "setuptools>=77" wheel; \
    python -m pip install $src /opt/lgff/meta; \
    python -m pip install $src --no-deps ${SAMPLE_PKGS}; \
    python -m pip uninstall -y lgff; \
    rm -rf /tmp/wheelhouse /opt/lgff/meta

# ---------------------------------------------------------------------------------------------------------- image
FROM ${BASE_IMAGE}
ARG BAKE_WEIGHTS=""
COPY --from=deps /opt/lgff/venv /opt/lgff/venv
# (the official image needs libgomp1 from apt; lgff-base has it)
RUN if ! ldconfig -p | grep -q 'libgomp.so.1'; then \
        apt-get update && apt-get install -y --no-install-recommends libgomp1 ca-certificates \
        && rm -rf /var/lib/apt/lists/*; fi \
 && (getent group 1000 >/dev/null || groupadd --gid 1000 lgff) \
 && (getent passwd 1000 >/dev/null || useradd --uid 1000 --gid 1000 --no-create-home --home-dir /tmp \
        --shell /usr/sbin/nologin lgff)
ENV PATH=/opt/lgff/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    MPLCONFIGDIR=/tmp/.cache/matplotlib \
    TORCH_HOME=/tmp/.cache/torch \
    HF_HOME=/tmp/.cache/huggingface \
    HF_HUB_OFFLINE=1 \
    LGFF_WEIGHTS_DIR=/opt/lgff/weights \
    OMP_NUM_THREADS=4

WORKDIR /opt/lgff
COPY pyproject.toml README.md ./
COPY configs ./configs
COPY lgff_core ./lgff_core
COPY components ./components
COPY pipelines ./pipelines
# editable install: lgff_core.config finds the presets in configs/ beside the package (/opt/lgff/configs);
# bytecode compiled now, since nothing may write under /opt at run time
RUN python -m pip install --no-index --no-deps --no-build-isolation -e . \
 && python -m compileall -q /opt/lgff/lgff_core /opt/lgff/components /opt/lgff/pipelines \
 && python -c "import lgff_core.cli, components, pipelines, kfp, torch, faiss; print('lgff image ok', kfp.__version__, torch.__version__)"
COPY weights/ /opt/lgff/weights/
RUN for preset in ${BAKE_WEIGHTS}; do HF_HUB_OFFLINE=0 lgff models fetch-weights --config "$preset" \
        --out /opt/lgff/weights || exit 1; done; rm -rf /tmp/.cache

USER 1000:1000
WORKDIR /tmp
# no ENTRYPOINT: KFP (and kfp.local's DockerRunner) set each task's whole command; `docker run IMAGE` prints the help
CMD ["lgff", "--help"]
