"""lgff_core is the bottom layer: importing any of its modules never imports `pipelines` or `components`."""
import subprocess
import sys
from pathlib import Path

import pytest

import lgff_core

CHECK = """
import importlib, pkgutil, sys
import lgff_core
names = [m.name for m in pkgutil.walk_packages(lgff_core.__path__, "lgff_core.")
         if not m.name.endswith("__main__")]
for name in names:
    importlib.import_module(name)
from lgff_core.cli import build_parser
build_parser()  # every sub-command registered, including `lgff pipeline` / `lgff demo`
from lgff_core.pipeline import pipeline_names
pipeline_names()
above = sorted(m for m in sys.modules if m.split(".")[0] in ("pipelines", "components"))
print(len(names), above)
"""


@pytest.mark.slow  # imports torch, timm, faiss and kfp in a fresh interpreter
def test_lgff_core_never_imports_pipelines_or_components():
    root = Path(lgff_core.__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", CHECK], cwd=root, capture_output=True, text=True, timeout=300,
                         env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    count, above = out.stdout.split(" ", 1)
    assert int(count) > 40 and above.strip() == "[]"


def test_pipelines_register_with_lgff_core():
    import pipelines
    from lgff_core.pipeline import pipeline_names, registered_pipelines

    assert set(pipelines.PIPELINES) <= set(pipeline_names())
    assert registered_pipelines()["reindex"] is pipelines.PIPELINES["reindex"]
