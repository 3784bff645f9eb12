"""A prep killed mid-write leaves no dataset; rerunning it produces the same bytes as an uninterrupted run."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from lgff_core.data import read_manifest
from lgff_core.data.testing import make_imagefolder_tree

REPO = Path(__file__).resolve().parent.parent


def _prep(src, out):
    return [sys.executable, "-m", "lgff_core", "-q", "prep", "imagefolder", "--src", str(src), "--out", str(out),
            "--shard-mb", "0.002", "--no-progress"]


def test_rerun_after_kill_matches_uninterrupted_run(tmp_path):
    src = make_imagefolder_tree(tmp_path / "src", classes=tuple(f"c{i}" for i in range(6)), per_class=60,
                                size=(48, 48), fmt="jpg")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_prep(src, killed), env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if (killed / "part-00004.parquet").exists():
            break
        time.sleep(0.005)
    assert proc.poll() is None, f"prep finished before it could be killed: {proc.stderr.read().decode()[-500:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    parts_left = sorted(p.name for p in killed.iterdir())
    assert "_manifest.json" not in parts_left and any(n.startswith("part-") for n in parts_left)

    # rerun into the killed prefix, and a clean run elsewhere
    subprocess.run(_prep(src, killed), env=env, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    clean = tmp_path / "clean"
    subprocess.run(_prep(src, clean), env=env, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    a, b = read_manifest(str(killed)), read_manifest(str(clean))
    assert a.num_rows == b.num_rows == 360 and a.num_shards > 5
    assert [(s.name, s.sha256) for s in a.shards] == [(s.name, s.sha256) for s in b.shards]
    assert (killed / "_manifest.json").read_bytes() == (clean / "_manifest.json").read_bytes()
    assert sorted(p.name for p in killed.iterdir()) == sorted(p.name for p in clean.iterdir())  # no stale files
