"""`lgff report` (lgff_core.evaluate.report): model vs baseline tables, self-contained HTML, figures, bad input."""
import base64
import json
import re

import numpy as np
import pytest

from lgff_core.cli import main
from lgff_core.data.images import encode_png
from lgff_core.data.shards import Manifest, ShardWriter, write_manifest
from lgff_core.data.embeddings import EmbeddingTable, write_embeddings
from lgff_core.evaluate.report import projection_2d

N, N_CLASSES = 24, 3


def _dataset(uri):
    rng = np.random.default_rng(0)
    w = ShardWriter(uri, shard_mb=1.0)
    for i in range(N):
        img = np.full((32, 32, 3), 40, np.uint8)
        img[..., i % N_CLASSES] = 200
        img = np.clip(img + rng.integers(0, 30, img.shape), 0, 255).astype(np.uint8)
        w.write({"sample_id": f"s{i:03d}", "image": encode_png(img), "label": i % N_CLASSES,
                 "label_name": f"tissue{i % N_CLASSES}", "group": f"g{i}", "split": "test" if i % 4 == 0 else "train",
                 "width": 32, "height": 32, "source": f"{i}.png"})
    write_manifest(Manifest(uri=uri, shards=w.close(), label_names=[f"tissue{c}" for c in range(N_CLASSES)]))
    return uri


def _embeddings(uri, noise, model, dataset, seed):
    rng = np.random.default_rng(seed)
    labels = np.arange(N) % N_CLASSES
    x = np.eye(8, dtype=np.float32)[labels] + noise * rng.normal(size=(N, 8)).astype(np.float32)
    write_embeddings(uri, EmbeddingTable(
        ids=np.array([f"s{i:03d}" for i in range(N)], dtype=object), labels=labels.astype(np.int64),
        groups=np.array([f"g{i}" for i in range(N)], dtype=object),
        splits=np.array(["test" if i % 4 == 0 else "train" for i in range(N)], dtype=object),
        xb=x / np.linalg.norm(x, axis=1, keepdims=True), label_names=[f"tissue{c}" for c in range(N_CLASSES)]),
        model=model, source=dataset)
    return uri


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    root = tmp_path_factory.mktemp("rep")
    ds = _dataset(str(root / "ds"))
    outs = {}
    for model, noise in (("lgff-model", 0.05), ("baseline-gem-last", 2.0)):
        emb = _embeddings(str(root / f"emb-{model}"), noise, model, ds, seed=1)
        out = str(root / f"eval-{model}")
        assert main(["-q", "evaluate", "retrieval", "--embeddings", emb, "--protocol", "test-vs-train",
                     "--out", out]) == 0
        outs[model] = out
    return root, outs


def test_report_model_vs_baseline(evaluated):
    root, outs = evaluated
    rep = str(root / "report")
    # baseline given first: the report still puts it last and computes deltas against it
    assert main(["-q", "report", "--metrics", outs["baseline-gem-last"], "--metrics", outs["lgff-model"],
                 "--out", rep]) == 0
    html = open(f"{rep}/report.html").read()
    md = open(f"{rep}/report.md").read()
    model = json.load(open(f"{outs['lgff-model']}/metrics.json"))
    base = json.load(open(f"{outs['baseline-gem-last']}/metrics.json"))
    assert model["dataset"].endswith("ds") and model["neighbors"].endswith("neighbors.parquet")
    # table: header order model, baseline, delta; values in percent with two decimals
    header = next(line for line in md.splitlines() if line.startswith("| metric"))
    assert header == ("| metric (%) [95% CI] | lgff-model [test-vs-train] | baseline-gem-last [test-vs-train] "
                      "(baseline) | Δ lgff-model [test-vs-train] |")
    eta = next(line for line in md.splitlines() if line.startswith("| eta_p |"))
    m, b = model["metrics"]["eta_p"], base["metrics"]["eta_p"]
    assert eta == f"| eta_p | {100 * m:.2f} | {100 * b:.2f} | {100 * (m - b):+.2f} |"
    assert "| mAP (full ranking) |" in md and "| mMV@5 |" in md
    # Recall@k and mAP carry their bootstrap interval, for the model and the baseline
    r1 = next(line for line in md.splitlines() if line.startswith("| Recall@1 |"))
    for run in (model, base):
        lo, hi = run["ci95"]["recall@1"]
        assert f"{100 * run['metrics']['recall@1']:.2f} [{100 * lo:.2f}, {100 * hi:.2f}]" in r1
    assert f"| database searched | {model['database_size']} | {base['database_size']} |" in md
    assert model["protocol_caption"] in md and "divided by min(k, R)" in md
    # per-class table beside the chart: one row per class with each run's top-1 accuracy
    section = md.split("## Per-class top-1 accuracy", 1)[1]
    assert section.index("| class |") < section.index("per_class_accuracy.png")
    row0 = next(line for line in section.splitlines() if line.startswith("| 0 |"))
    pc = {r["label"]: r for r in model["per_class"]}
    assert row0.startswith(f"| 0 | {pc[0]['name']} | {pc[0]['n_queries']} | {round(100 * pc[0]['accuracy'], 2)}")
    # self-contained HTML: every figure inline, no external references
    imgs = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", html)
    assert len(imgs) == 5  # per-class chart + projection and query grid for each run
    assert all(base64.b64decode(i)[:8] == b"\x89PNG\r\n\x1a\n" for i in imgs)
    assert not re.search(r"src=['\"](?!data:)", html)
    assert "figures/per_class_accuracy.png" in md and (root / "report" / "figures" / "queries_0.png").exists()


def test_report_html_path_and_no_baseline(evaluated):
    root, outs = evaluated
    assert main(["-q", "report", "--metrics", f"{outs['lgff-model']}/metrics.json", "--out",
                 str(root / "r.html")]) == 0
    md = open(root / "r.md").read()
    assert "No baseline run given" in md and "Δ" not in md
    assert (root / "r_figures" / "per_class_accuracy.png").exists()


def test_report_bad_input(tmp_path):
    assert main(["-q", "report", "--metrics", str(tmp_path / "missing"), "--out", str(tmp_path / "r")]) == 2
    (tmp_path / "x.json").write_text('{"not": "metrics"}')
    assert main(["-q", "report", "--metrics", str(tmp_path / "x.json"), "--out", str(tmp_path / "r")]) == 2
    assert not (tmp_path / "r" / "report.html").exists()


def test_pca_projection_separates_clusters_and_is_deterministic():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 0.1, (20, 5)), rng.normal(3, 0.1, (20, 5))])
    a, method = projection_2d(x)
    b, _ = projection_2d(x[::-1].copy())
    assert a.shape == (40, 2)
    if method == "PCA":
        # first component splits the two clusters; sign fixed regardless of row order
        assert np.sign(a[:20, 0]).std() == 0 and np.sign(a[:20, 0])[0] != np.sign(a[20:, 0])[0]
        np.testing.assert_allclose(a[::-1], b, atol=1e-9)
