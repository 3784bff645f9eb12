"""Ablation CAM explanations of retrievals on every terminal neck node (the thesis's Figs 5.3-5.15).

Ablation-CAM (Desai & Ramaswamy, WACV 2020), computed with the `grad-cam` package's `AblationCAM`:
for a target layer with activations A (C, h, w) and a scalar target y, channel c gets the weight
``w_c = (y - y_c) / y`` where y_c is the target with channel c of A set to zero, and the map is
``relu(sum_c w_c A_c)``, min-max normalised to [0, 1] and resized (bilinear) to the input size.

Target: the cosine similarity of the explained image's descriptor to the query's descriptor (`CosineToQuery`), so
a map shows where the image holds what makes it similar to the query (for the query itself y = 1).
Target layers: every terminal node P1_2, P2_2, P3_2, P4_2 of every neck layer (`neck_nodes`), one AblationCAM per
node. The *collapse* of a layer's four nodes is the mean of their four normalised, input-sized maps, normalised
again to [0, 1] (grad-cam's own multi-layer aggregation).

Differences from the package defaults, and why:
- the ablated channel is set to zero (`ZeroAblationLayer`, as in the paper); the package's default writes
  ``min - 1e7`` when activations can be negative, which breaks the fused nodes that follow an inner neck layer;
- the frozen backbone runs once per explained image (`_BackboneOnce`): every ablation pass repeats one image, and
  only the neck and head depend on the ablated node;
- explanations run in float32 (no bf16 autocast), so the query's own target is 1 up to rounding.

Cost per image: (number of neck layers x 4) x C / batch_size forward passes of the neck + head.
"""
from __future__ import annotations

import base64
import html
import io
import json
import logging
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import storage
from ..errors import LGFFError

logger = logging.getLogger(__name__)

__all__ = ["CosineToQuery", "ZeroAblationLayer", "neck_nodes", "explain_image", "render_grid", "explain_to_dir",
           "explain_index_queries"]

NODE_LABELS = ("P1_2", "P2_2", "P3_2", "P4_2")
COLLAPSE = "collapse"


class CosineToQuery:
    """CAM target: cosine similarity of a model output (one descriptor, (D,)) to a fixed query descriptor."""

    def __init__(self, query: torch.Tensor):
        self.query = F.normalize(query.detach().float().flatten(), dim=0)

    def __call__(self, output: torch.Tensor) -> torch.Tensor:
        return torch.dot(F.normalize(output.float().flatten(), dim=0), self.query.to(output.device))


def _ablation_layer_class():
    from pytorch_grad_cam.ablation_layer import AblationLayer

    class ZeroAblationLayer(AblationLayer):
        """Sets the ablated channel to zero (Ablation-CAM paper), whatever the sign of the activations."""

        def __call__(self, x):
            out = self.activations
            for i in range(out.size(0)):
                out[i, self.indices[i]] = 0
            return out

    return ZeroAblationLayer


def ZeroAblationLayer():  # noqa: N802 - reads as a layer; built lazily so grad-cam is imported only when used
    return _ablation_layer_class()()


class _BackboneOnce(nn.Module):
    """``model(x)`` with the frozen backbone computed once for a batch that repeats one image (ablation passes)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self._image: Optional[torch.Tensor] = None
        self._features: Optional[list] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first = x[:1]
        if not torch.equal(x, first.expand_as(x)):
            return self.model(x)
        if self._image is None or self._image.shape != first.shape or not torch.equal(self._image, first):
            self._image = first.detach().clone()
            self._features = self.model.forward_features(first)
        features = [f.expand(x.shape[0], *f.shape[1:]).contiguous() for f in self._features]
        return self.model.forward_head(features)


def neck_nodes(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``[("layer1/P1_2", module), ...]``: the terminal nodes of every neck layer, in (layer, level) order."""
    from ..models.pyramid import OUTPUT_NODES

    neck = getattr(model, "neck", None)
    layers = getattr(neck, "layers", None)
    if layers is None:
        raise LGFFError(f"{type(model).__name__} has no neck to explain (explain needs an LGFF model, "
                        "not the GeM baseline)")
    return [(f"layer{li + 1}/{label}", layer.nodes[node])
            for li, layer in enumerate(layers) for node, label in zip(OUTPUT_NODES, NODE_LABELS)]


def explain_image(model: nn.Module, image: torch.Tensor, query: torch.Tensor, batch_size: int = 32,
                  ratio_channels: float = 1.0) -> tuple[dict[str, np.ndarray], float]:
    """Ablation CAM maps of one normalised image (3, S, S) against a query descriptor (D,).

    Returns ``({"layer1/P1_2": (S, S) map in [0, 1], ..., "layer1/collapse": ...}, target score)``.
    """
    from pytorch_grad_cam import AblationCAM
    from pytorch_grad_cam.utils.image import scale_cam_image

    wrapped = _BackboneOnce(model).eval()
    target = CosineToQuery(query)
    x = image.unsqueeze(0).float()
    with torch.no_grad():
        score = float(target(wrapped(x)[0]))
    maps: dict[str, np.ndarray] = {}
    per_layer: dict[str, list[np.ndarray]] = {}
    for name, node in neck_nodes(model):
        cam = AblationCAM(wrapped, [node], ablation_layer=ZeroAblationLayer(), batch_size=batch_size,
                          ratio_channels_to_ablate=ratio_channels)
        try:
            with _quiet_tqdm():
                grayscale = cam(x, targets=[target])[0]
        finally:
            cam.activations_and_grads.release()
        maps[name] = grayscale.astype(np.float32)
        per_layer.setdefault(name.split("/")[0], []).append(maps[name])
    for layer, node_maps in per_layer.items():
        maps[f"{layer}/{COLLAPSE}"] = scale_cam_image(np.mean(node_maps, axis=0)[None])[0].astype(np.float32)
    return maps, score


class _quiet_tqdm:
    """grad-cam draws a tqdm bar per ablation batch; keep library output in the log instead."""

    def __enter__(self):
        import pytorch_grad_cam.ablation_cam as mod

        self._mod, self._orig = mod, mod.tqdm.tqdm
        mod.tqdm.tqdm = lambda it, *a, **k: it
        return self

    def __exit__(self, *exc):
        self._mod.tqdm.tqdm = self._orig


def _display_image(image: torch.Tensor, data_config: dict) -> np.ndarray:
    mean = torch.tensor(data_config["mean"]).view(3, 1, 1)
    std = torch.tensor(data_config["std"]).view(3, 1, 1)
    return (image * std + mean).clamp(0, 1).permute(1, 2, 0).numpy().astype(np.float32)


def render_grid(rgb: np.ndarray, maps: dict[str, np.ndarray], title: str) -> bytes:
    """PNG: one row per neck layer: the image, then the heat-map overlay of P1_2..P4_2 and their collapse."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from pytorch_grad_cam.utils.image import show_cam_on_image

    layers = sorted({k.split("/")[0] for k in maps}, key=lambda s: int(s.removeprefix("layer")))
    cols = ["image", *NODE_LABELS, COLLAPSE]
    # the title holds sample ids, class and file names: drawn as written, never parsed as math ('$' in a name)
    with matplotlib.rc_context({"text.parse_math": False}):
        fig, axes = plt.subplots(len(layers), len(cols), figsize=(1.9 * len(cols), 2.0 * len(layers) + 0.5),
                                 squeeze=False)
        for r, layer in enumerate(layers):
            for c, col in enumerate(cols):
                ax = axes[r][c]
                ax.set_xticks([])
                ax.set_yticks([])
                if col == "image":
                    ax.imshow(rgb)
                    ax.set_ylabel(layer, fontsize=9)
                else:
                    ax.imshow(show_cam_on_image(rgb, maps[f"{layer}/{col}"], use_rgb=True, image_weight=0.55))
                if r == 0:
                    ax.set_title(col, fontsize=9)
        fig.suptitle(title, fontsize=9)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=90)
        plt.close(fig)
    return buf.getvalue()


def quadrant_mass(cam: np.ndarray) -> np.ndarray:
    """Share of the map's mass in each quadrant (top-left, top-right, bottom-left, bottom-right)."""
    h, w = cam.shape
    q = [cam[: h // 2, : w // 2], cam[: h // 2, w // 2:], cam[h // 2:, : w // 2], cam[h // 2:, w // 2:]]
    total = float(cam.sum()) or 1.0
    return np.array([float(p.sum()) / total for p in q])


_CSS = ("body{font-family:sans-serif;margin:1.5em;color:#222;max-width:1200px}h2{margin-top:1.6em}"
        "img{max-width:100%;border:1px solid #ddd}.meta{color:#666;font-size:90%}")


def explain_to_dir(searcher, queries, top: int, out_uri: str, batch_size: int = 32,
                   ratio_channels: float = 1.0) -> dict:
    """Explain each query and its `top` hits; writes PNG grids, explain.json and explain.html (last)."""
    from ..data.images import decode_image
    from ..data.transforms import eval_transform

    model = searcher.embedder.model
    neck_nodes(model)  # fail early on the baseline
    model = model.float().to(memory_format=torch.contiguous_format).eval()
    transform = eval_transform(searcher.embedder.data_config, searcher.embedder.image_size)
    data_config = searcher.embedder.data_config
    k = top + 1  # one spare: a query taken from the index finds itself first
    hits = searcher.search([q.data for q in queries], min(k, searcher.bundle.index.ntotal))
    hit_images = searcher.hit_images(h["position"] for row in hits for h in row)
    doc = {"index": searcher.index_uri, "model": searcher.embedder.name, "top": top, "queries": [],
           "collapse": "mean of the four min-max normalised node maps of a layer, normalised again"}
    body = [f"<h1>Ablation CAM: what makes the hits similar to the query</h1><p class='meta'>model "
            f"{html.escape(searcher.embedder.name)}; index {html.escape(searcher.index_uri)}. Target = cosine "
            "similarity of each image's descriptor to the query's; one map per terminal neck node P1_2..P4_2 of every "
            "neck layer and their collapse (mean of the four normalised maps). Red = ablating the channels active "
            "there lowers the similarity most.</p>"]
    for qi, (q, row) in enumerate(zip(queries, hits)):
        row = [h for h in row if q.sample_id is None or h["sample_id"] != q.sample_id][:top]
        q_image = transform(decode_image(q.data))
        with torch.no_grad():
            q_vec = model(q_image.unsqueeze(0).float())[0]
        entries = [("query", q.name, q.label_name, None, q_image)]
        entries += [(f"hit{j + 1}", h["sample_id"], h["label_name"], h["score"],
                     transform(decode_image(hit_images[h["position"]]))) for j, h in enumerate(row)]
        qdoc = {"query": q.name, "label_name": q.label_name, "images": []}
        body.append(f"<h2>Query {qi + 1}: {html.escape(q.name)}"
                    + (f" ({html.escape(q.label_name)})" if q.label_name else "") + "</h2>")
        for tag, name, label_name, score, image in entries:
            logger.info("explaining query %d %s: %s", qi + 1, tag, name)
            maps, target = explain_image(model, image, q_vec, batch_size, ratio_channels)
            title = (f"query {name}" if score is None else f"{tag}: {name}  score {score:.4f}") + \
                (f"  [{label_name}]" if label_name else "") + f"  (target cosine {target:.4f})"
            png = render_grid(_display_image(image, data_config), maps, title)
            fname = f"query{qi + 1}_{tag}.png"
            storage.write_bytes(storage.join(out_uri, fname), png)
            qdoc["images"].append({"role": tag, "name": name, "label_name": label_name, "score": score,
                                   "target": target, "png": fname})
            body.append(f"<h3>{html.escape(title)}</h3><img alt='{html.escape(fname)}' "
                        f"src='data:image/png;base64,{base64.b64encode(png).decode('ascii')}'>")
        doc["queries"].append(qdoc)
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>LGFF explanations</title><style>{_CSS}"
            f"</style></head><body>{''.join(body)}</body></html>")
    storage.write_text(storage.join(out_uri, "explain.json"), json.dumps(doc, indent=1))
    storage.write_text(storage.join(out_uri, "explain.html"), page)  # last: the page means complete
    return doc


def pick_index_queries(dataset_uri: str, split: str, n: int) -> list[str]:
    """`n` sample_ids of `split`, evenly spaced over the split in sample_id order (deterministic)."""
    from ..data.shards import read_table

    t = read_table(dataset_uri, columns=["sample_id", "split"])
    ids = sorted(sid for sid, s in zip(t.column("sample_id").to_pylist(), t.column("split").to_pylist()) if s == split)
    if not ids:
        raise LGFFError(f"{dataset_uri}: no rows of split {split!r} to explain")
    pick = sorted(set(np.linspace(0, len(ids) - 1, min(n, len(ids))).round().astype(int).tolist()))
    return [ids[i] for i in pick]


def explain_index_queries(model_uri: str, index_uri: str, out_uri: str, cfg, query_split: Optional[str] = None,
                          num_queries: Optional[int] = None) -> dict:
    """The pipeline's explain stage: a few queries of the indexed dataset's query split, with their top hits."""
    from .search import Searcher, index_sources, read_query_ids

    searcher = Searcher(model_uri, index_uri, cfg)
    dataset_uri, _ = index_sources(searcher.bundle)
    ids = pick_index_queries(dataset_uri, query_split or cfg.evaluate.query_split,
                             cfg.explain.num_queries if num_queries is None else num_queries)
    queries = read_query_ids(dataset_uri, ids)
    return explain_to_dir(searcher, queries, cfg.explain.top, out_uri, cfg.explain.batch_size,
                          cfg.explain.ratio_channels)

