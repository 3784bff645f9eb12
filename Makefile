# Every target does its own set-up: a fresh clone needs nothing but python3 (>=3.10) and make.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Sample-data packages are read by path only; their own dependencies are heavy and never imported.
SAMPLE_PKGS := histolytics==0.3.0 stardist==0.9.2

# Containers (../shared/CONTAINERS.md): slow artefacts are cached outside the clone, in $(LGFF_CACHE).
LGFF_CACHE ?= $(HOME)/.cache/lgff
IMAGE      ?= lgff:dev
BASE_IMAGE ?= lgff-base:bookworm
# presets whose timm hub weights are baked into the image (fetched on this host, which then needs the hub once)
BAKE_WEIGHTS ?=
DOCKER     ?= docker
BUILD_NETWORK ?= none
WHEELS     := $(LGFF_CACHE)/wheelhouse
BASE_TAR   := $(LGFF_CACHE)/lgff-base-bookworm.tar
BASE_PACKAGES := python3,python3-venv,python3-pip,ca-certificates,libgomp1

.PHONY: install test test-fast demo bench clean wheelhouse base-image image cluster-check docker-up

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# pip (not uv/poetry): torch/torchvision resolve from the machine's local wheels when a pip cap is set.
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	$(BIN)/python -m pip install --quiet --no-deps $(SAMPLE_PKGS)
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

demo: $(STAMP)
	$(BIN)/lgff demo --out runs/demo

bench: $(STAMP)
	for b in bench/*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf runs build *.egg-info .pytest_cache

# Wheels of the project's dependencies (same pip settings as `install`), rebuilt only when pyproject.toml changes.
wheelhouse: $(STAMP)
	@if [ -f $(WHEELS)/.pyproject.sha256 ] && sha256sum pyproject.toml | cmp -s - $(WHEELS)/.pyproject.sha256; then \
	    echo "wheelhouse up to date: $(WHEELS)"; else \
	  set -e; rm -rf $(WHEELS).partial; mkdir -p $(WHEELS).partial; \
	  $(BIN)/python -m pip wheel --quiet -w $(WHEELS).partial . "setuptools>=77" wheel; \
	  $(BIN)/python -m pip download --quiet --no-deps -d $(WHEELS).partial $(SAMPLE_PKGS); \
	  rm -f $(WHEELS).partial/lgff-*.whl; sha256sum pyproject.toml > $(WHEELS).partial/.pyproject.sha256; \
	  rm -rf $(WHEELS); mv $(WHEELS).partial $(WHEELS); echo "wheelhouse: $(WHEELS)"; fi

docker-up:
	@.ci/dockerd-up

# Debian bookworm minbase (its python3 is 3.11, as on this host, so the host-built wheels fit) -> $(BASE_IMAGE)
base-image: docker-up
	@if $(DOCKER) image inspect $(BASE_IMAGE) >/dev/null 2>&1; then echo "base image $(BASE_IMAGE) present"; else \
	  set -e; mkdir -p $(LGFF_CACHE); \
	  if [ ! -f $(BASE_TAR) ]; then \
	    mmdebstrap --variant=minbase --include=$(BASE_PACKAGES) bookworm $(BASE_TAR).partial.tar; \
	    mv $(BASE_TAR).partial.tar $(BASE_TAR); fi; \
	  $(DOCKER) import $(BASE_TAR) $(BASE_IMAGE); fi

# The project image, offline: wheels hard-linked into the build context, nothing fetched by the build.
image: base-image wheelhouse
	rm -f wheelhouse/*.whl
	cp -al $(WHEELS)/*.whl wheelhouse/ 2>/dev/null || cp $(WHEELS)/*.whl wheelhouse/
	for preset in $(BAKE_WEIGHTS); do $(BIN)/lgff models fetch-weights --config $$preset --out weights || exit 1; done
	DOCKER_BUILDKIT=0 $(DOCKER) build --quiet --network $(BUILD_NETWORK) --build-arg BASE_IMAGE=$(BASE_IMAGE) -t $(IMAGE) .
	rm -f wheelhouse/*.whl
	$(DOCKER) image prune -f >/dev/null
	@$(DOCKER) image ls $(IMAGE)

# The stages in the image: kfp.local DockerRunner, then both compiled pipelines under the launcher-contract runner
# (tests/cluster, marker `cluster`; `make test` leaves them out).
cluster-check: image
	LGFF_IMAGE=$(IMAGE) $(BIN)/python -m pytest -q -m cluster tests/cluster
