"""Checks that run the stages in the built image (`make cluster-check`: needs a Docker engine and `make image`).

Every test here carries the `cluster` marker (tests/conftest.py leaves them out unless ``-m cluster`` selects them).
`LGFF_IMAGE` names the image (default ``lgff:dev``, what `make image` builds). Per-task timings and downloaded
bytes collected by the tests are printed at the end of the session.
"""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest

IMAGE = os.environ.get("LGFF_IMAGE", "lgff:dev")
# what a restricted pod gets on a cluster: non-root, read-only root FS, no capabilities, writable /tmp only
CONTAINER_HARDENING = {
    "user": "1000:1000",
    "read_only": True,
    "cap_drop": ["ALL"],
    "security_opt": ["no-new-privileges"],
    "tmpfs": {"/tmp": "rw,exec,size=4g"},
}
REPORT_LINES: list[str] = []


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/cluster/" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(pytest.mark.cluster)


@pytest.fixture(scope="session")
def image() -> str:
    if shutil.which("docker") is None:
        pytest.fail("docker CLI not found (make cluster-check installs nothing; see .ci/run)")
    probe = subprocess.run(["docker", "image", "inspect", IMAGE], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.fail(f"image {IMAGE} not built: run `make image` (or make cluster-check)")
    return IMAGE


def docker_run(image: str, *command: str, network: str = "none", timeout: float = 300) -> subprocess.CompletedProcess:
    args = ["docker", "run", "--rm", f"--network={network}", "--user=1000:1000", "--read-only", "--cap-drop=ALL",
            "--security-opt=no-new-privileges", "--tmpfs=/tmp:rw,exec,size=1g", image, *command]
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout)


def pytest_terminal_summary(terminalreporter):
    if REPORT_LINES:
        terminalreporter.section("cluster-check: per-task times and downloaded bytes")
        for line in REPORT_LINES:
            terminalreporter.write_line(line)
