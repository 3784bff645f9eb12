"""The image as a restricted pod runs it: uid 1000, read-only root filesystem, no network, no capabilities."""
from __future__ import annotations

from .conftest import docker_run


def test_image_runs_restricted_and_offline(image):
    script = (
        "import os, pathlib, tempfile, lgff_core, torch, faiss, kfp, matplotlib.pyplot;"
        "print('uid', os.getuid());"
        "print('weights', os.environ['LGFF_WEIGHTS_DIR'], os.environ['HF_HUB_OFFLINE']);"
        "tempfile.NamedTemporaryFile(dir='/tmp').close();"
        "p = pathlib.Path('/opt/lgff/probe');\n"
        "try:\n    p.write_text('x'); print('opt writable')\n"
        "except OSError:\n    print('opt read-only')\n"
    )
    out = docker_run(image, "python", "-c", script)
    assert out.returncode == 0, out.stderr
    assert "uid 1000" in out.stdout and "opt read-only" in out.stdout
    assert "weights /opt/lgff/weights 1" in out.stdout
    # the whole CLI works offline; pip is never needed at run time
    out = docker_run(image, "lgff", "models", "summary", "--config", "lgffem_cpu")
    assert out.returncode == 0, out.stderr
    assert "package:efficientnet-lite0" in out.stdout


def test_hub_preset_without_baked_weights_fails_fast_offline(image):
    """lgffem_paper needs timm hub weights: in the image they come from /opt/lgff/weights or not at all."""
    out = docker_run(image, "python", "-c",
                     "from lgff_core.models import FrozenBackbone; FrozenBackbone('convnext_atto', weights='timm')",
                     timeout=120)
    assert out.returncode != 0
    assert "/opt/lgff/weights/convnext_atto.safetensors does not exist" in out.stderr
