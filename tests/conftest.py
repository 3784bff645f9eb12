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


def pytest_collection_modifyitems(config, items):
    """Tests marked `cluster` (tests/cluster: need Docker and the built image) run only when selected with
    ``-m cluster`` (`make cluster-check`); the default `make test` leaves them out."""
    if "cluster" in (config.getoption("markexpr") or ""):
        return
    kept = [item for item in items if item.get_closest_marker("cluster") is None]
    if len(kept) != len(items):
        config.hook.pytest_deselected(items=[i for i in items if i.get_closest_marker("cluster") is not None])
        items[:] = kept


@pytest.fixture(scope="session")
def nuclei(tmp_path_factory):
    """The real nuclei-coco sample set (stardist / histolytics tiles with instance masks), prepped once."""
    from lgff_core.cli import main

    out = tmp_path_factory.mktemp("samples") / "sets"
    assert main(["-q", "prep", "samples", "--out", str(out), "--sets", "nuclei-coco", "--no-progress"]) == 0
    return str(out / "nuclei-coco")
