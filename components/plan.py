"""scan and plan: content fingerprints of imported sources (`lgff scan`) and the run-time fan-out (`lgff plan`)."""
from typing import List, NamedTuple

from kfp import dsl

from ._image import LGFF_IMAGE


@dsl.component(base_image=LGFF_IMAGE, install_kfp_package=False)
def scan(data_uri: str, model_uri: str = "", mode: str = "rebuild", base_index_uri: str = "",
         index_metric: str = "") -> NamedTuple(
        "Outputs", [("data_fingerprint", str), ("model_fingerprint", str), ("base_index", str),
                    ("base_index_fingerprint", str)]):
    """Fingerprint the sources imported by URI; the pipelines run this task with caching off and pass the
    fingerprints as parameters to the tasks that read the sources, so their cache keys follow the bytes. Also
    checks the reindex ``mode`` (a bad one, append without a readable ``base_index_uri``, or a base index whose
    dimension differs from the model's embeddings or whose metric is not ``index_metric``, fails here first);
    for append, ``base_index`` is the index prefix to append to and ``base_index_fingerprint`` the sha256 of its
    index.json ("" for rebuild)."""
    import json
    import os
    import tempfile
    from collections import namedtuple

    from lgff_core.kfp.runtime import run_cli

    uris = [u for u in (data_uri, model_uri) if u]
    out = os.path.join(tempfile.mkdtemp(prefix="lgff-scan-"), "scan.json")
    run_cli(["scan", *uris, "--mode", mode, "--base-index", base_index_uri, "--model", model_uri,
             "--metric", index_metric, "--out", out])
    with open(out) as f:
        facts = json.load(f)
    fp = {u: facts[u]["fingerprint"] for u in uris}
    base = facts.get(base_index_uri, {}) if mode == "append" else {}
    return namedtuple("Outputs", ["data_fingerprint", "model_fingerprint", "base_index", "base_index_fingerprint"])(
        fp[data_uri], fp.get(model_uri, ""), base.get("uri", ""), base.get("fingerprint", ""))


@dsl.component(base_image=LGFF_IMAGE, install_kfp_package=False)
def plan(data_uri: str, data_fingerprint: str, rows_per_task: int) -> List[dict]:
    """Work blocks of about ``rows_per_task`` rows of the dataset (the items of the embed / index-add ParallelFor;
    a single output, the form kfp.local can iterate over). Typed ``List[dict]``, not ``list``: the SDK types the
    loop item after it (STRUCT, as ``block`` is declared where it is used); a STRING item would reach the tasks as
    JSON text, which KFP's driver refuses for a STRUCT input (DESIGN.md section 7). ``data_fingerprint`` only enters
    the cache key: a changed dataset is planned again."""
    import json
    import os
    import tempfile

    from lgff_core.kfp.runtime import run_cli

    out = os.path.join(tempfile.mkdtemp(prefix="lgff-plan-"), "blocks.json")
    run_cli(["plan", "--data", data_uri, "--rows-per-task", rows_per_task, "--out", out])
    with open(out) as f:
        return json.load(f)
