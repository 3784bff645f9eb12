import os

import pytest

# Deterministic, small thread pools: 2 cores, several test processes may share them.
os.environ.setdefault("OMP_NUM_THREADS", "2")


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
