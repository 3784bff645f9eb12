"""Shared set-up for the search / explain / serve tests: a tiny LGFF checkpoint, its embeddings and index."""
from __future__ import annotations

import torch

from lgff_core.config import config_to_dict, load_config
from lgff_core.train.checkpoint import backbone_weights_id, save_checkpoint

# random-init EfficientNet-Lite0 (no weights file needed), LGFFN-E C=16 x 1 layer, fp32, 64 px
TINY = {"model.backbone.weights": "none", "model.channels": 16, "model.num_layers": 1, "train.image_size": 64,
        "embed.image_size": 64, "embed.batch_size": 8, "embed.bf16": False, "embed.channels_last": False,
        "embed.device": "cpu", "index.k": 5, "explain.batch_size": 16}
TINY_SET = [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in TINY.items()]


def tiny_config():
    return load_config(None, TINY)


def make_checkpoint(prefix: str, cfg=None) -> str:
    """An untrained LGFF checkpoint (built under the config seed, as the trainer builds)."""
    from lgff_core.models import build_model

    cfg = cfg or tiny_config()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = build_model(cfg)
    meta = {"name": "tiny-lgff", "config": config_to_dict(cfg), "epoch": 0,
            "backbone": {"name": cfg.model.backbone.name, "weights_hash": backbone_weights_id(model, cfg)}}
    save_checkpoint(prefix, model.trainable_state_dict(), meta)
    return prefix


def build_index_for(model_uri, data_uri, emb_uri, idx_uri, cfg=None, baseline=None):
    from lgff_core.retrieval.embed import embed_dataset
    from lgff_core.index import build_from_embeddings

    cfg = cfg or tiny_config()
    embed_dataset(model_uri, data_uri, emb_uri, cfg, baseline=baseline,
                  embedder=None if baseline is None else _baseline_embedder(cfg))
    build_from_embeddings(emb_uri, idx_uri, "Flat", "ip")
    return idx_uri


def _baseline_embedder(cfg):
    from lgff_core.retrieval.embed import load_embedder

    return load_embedder(None, cfg, "gem-last", weights="package:efficientnet-lite0")  # real, deterministic
