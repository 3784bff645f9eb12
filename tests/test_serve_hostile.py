"""The search service's start-up checks and the index reads it relies on, without a server (fast): a published
index version replaced while it is being loaded or read, settings of `lgff serve` that must fail at start."""
from __future__ import annotations

import threading

import faiss
import numpy as np
import pytest

from lgff_core.cli import build_parser, main
from lgff_core.config import ConfigError, load_config
from lgff_core.errors import LGFFError
from lgff_core.index import idmap_table, load_index, save_index, store
from lgff_core.data.embeddings import EmbeddingTable

faiss.omp_set_num_threads(1)


def _publish(uri: str, n: int, seed: int = 0) -> None:
    """A new version of a Flat index at `uri` (the previous version's files are deleted by the publication)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    t = EmbeddingTable(ids=np.array([f"v{seed}-{i}" for i in range(n)], dtype=object), labels=np.zeros(n, np.int64),
                       groups=np.array([f"g{i}" for i in range(n)], dtype=object),
                       splits=np.array(["train"] * n, dtype=object), xb=x)
    index = faiss.IndexFlatIP(8)
    index.add(x)
    save_index(index, idmap_table(t), uri, {"metric": "ip", "factory": "Flat"})


def test_loaded_index_reads_its_ids_after_a_rebuild_deletes_its_version(tmp_path):
    """Failure 2: the id map was reopened from the loaded version's path on every search; a rebuild in place
    (v1 -> v2) deleted it and every later search raised FileNotFoundError."""
    uri = str(tmp_path / "idx")
    _publish(uri, 20, seed=1)
    bundle = load_index(uri)
    _publish(uri, 30, seed=2)  # v2 published, v1's files deleted
    assert not (tmp_path / "idx" / "v1").exists()
    assert bundle.rows.take("sample_id", np.array([[0, 19]])).tolist() == [["v1-0", "v1-19"]]
    assert bundle.rows.find(["v1-5"]).tolist() == [5]
    assert bundle.idmap.num_rows == 20


def test_load_index_starts_over_when_the_version_is_replaced_while_loading(tmp_path, monkeypatch):
    """Failure 2: a loader that read index.json just before a writer published the next version (and deleted the
    files it named) failed; it now loads the new version."""
    uri = str(tmp_path / "idx")
    _publish(uri, 20, seed=1)
    real = store.read_manifest
    replaced = []

    def manifest_then_publish(u, *a, **kw):
        meta = real(u, *a, **kw)
        if not replaced:
            replaced.append(True)
            _publish(uri, 30, seed=2)  # meta now names deleted files
        return meta

    monkeypatch.setattr(store, "read_manifest", manifest_then_publish)
    bundle = load_index(uri)
    assert bundle.meta["version"] == 2 and bundle.index.ntotal == 30
    assert bundle.rows.take("sample_id", np.array([29])).tolist() == ["v2-29"]


def test_load_and_take_during_rebuilds_never_raise_a_raw_error(tmp_path):
    """Failure 2: a loop of load_index + rows.take during rebuilds hit a raw FileNotFoundError."""
    uri = str(tmp_path / "idx")
    _publish(uri, 50, seed=0)
    done = threading.Event()
    errors: list = []
    loads = [0]

    def reader():
        while not done.is_set():
            try:
                b = load_index(uri)
                b.rows.take("sample_id", np.arange(b.index.ntotal))
                loads[0] += 1
            except LGFFError:  # a one-line error is allowed (a version replaced three times during one load)
                pass
            except Exception as exc:  # noqa: BLE001
                errors.append(repr(exc))

    t = threading.Thread(target=reader)
    t.start()
    try:
        for i in range(1, 16):
            _publish(uri, 50 + i, seed=i)
    finally:
        done.set()
        t.join(timeout=60)
    assert not errors, errors[:3]
    assert loads[0] > 0


def test_serve_listens_on_localhost_unless_told():
    """Failure 1: the default bind was 0.0.0.0 (the manifest passes --host 0.0.0.0 for the pod)."""
    args = build_parser().parse_args(["serve", "--model", "m", "--index", "i"])
    assert args.host == "127.0.0.1"


def test_help_example_sends_json(capsys):
    """Failure 6: the `curl -d` example of --help sent a form body, which the service refuses."""
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = capsys.readouterr().out
    assert "curl -H 'Content-Type: application/json' -d '{\"instances\"" in out


@pytest.mark.parametrize("name", ["", " ", "a/b", "x y", "../lgff", "lgff:predict"])
def test_bad_model_name_fails_at_start_with_one_line(name, capsys):
    """Failure 7: `--set serve.model_name=` crashed with a traceback once the model was loaded; it is refused
    before anything is loaded (exit 2, one line naming the key)."""
    code = main(["serve", "--model", "no-such-ckpt", "--index", "no-such-index", "--set", f"serve.model_name={name}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "serve.model_name" in err and "\n" not in err and "Traceback" not in err


@pytest.mark.parametrize("key,value", [("serve.max_batch", 0), ("serve.max_wait_ms", -1), ("serve.max_body_mb", 0),
                                       ("serve.max_aspect_ratio", 0.5), ("serve.index_poll_s", -1)])
def test_serve_limits_are_validated(key, value):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.") + ".*must be"):
        load_config(None, {key: value})
