import os

import pytest

# Deterministic, small thread pools: 2 cores, several test processes may share them.
os.environ.setdefault("OMP_NUM_THREADS", "2")


def pytest_configure(config):
    # the pipeline definitions register with lgff_core when imported; an installed project also registers them as
    # `lgff.pipelines` entry points, but a development venv's install metadata may predate a new pipeline
    import pipelines  # noqa: F401


@pytest.fixture(autouse=True)
def _fixed_terminal_width(monkeypatch):
    # rich sizes tables and wraps lines to COLUMNS: CLI output asserted in tests must not depend on the terminal
    # the suite runs in (80 columns wraps a long temporary path in the middle of a message)
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.delenv("LINES", raising=False)


@pytest.fixture(autouse=True)
def _seed_torch():
    try:
        import torch
    except ImportError:  # pragma: no cover
        yield
        return
    torch.manual_seed(0)
    yield
