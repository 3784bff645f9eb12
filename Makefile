# Every target does its own set-up: a fresh clone needs nothing but python3 (>=3.10) and make.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Sample-data packages are read by path only; their own dependencies are heavy and never imported.
SAMPLE_PKGS := histolytics==0.3.0 stardist==0.9.2

.PHONY: install test test-fast demo bench clean

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
