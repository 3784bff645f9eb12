"""Shared helpers for the training tests: a tiny synthetic shard dataset and a tiny stand-in embedding model.

The stand-in honours the embedding-model contract of docs/architecture.md (backbone with feature_info /
data_config / weights_hash, forward_features, forward_head, trainable_state_dict, load_trainable_state_dict,
embedding_dim), so the trainer can be tested without timm in a fraction of a second.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from lgff_core.data.images import encode_png
from lgff_core.data.shards import Manifest, ShardWriter, write_manifest


def make_dataset(uri: str | Path, n_per_class=(12, 4, 4), num_classes: int = 3, size: int = 32, seed: int = 0,
                 labels_override: dict | None = None, rows_per_group: int = 8) -> str:
    """Classes differ by a colour tint and a stripe orientation, plus noise; splits train/val/test.

    `labels_override` maps a row position to a label id to write (e.g. -1) to build bad datasets.
    """
    rng = np.random.default_rng(seed)
    uri = str(uri)
    rows = []
    splits = ["train"] * n_per_class[0] + ["val"] * n_per_class[1] + ["test"] * n_per_class[2]
    yy, xx = np.mgrid[0:size, 0:size]
    for c in range(num_classes):
        tint = np.array([60 + 60 * (c % 3), 60 + 50 * ((c + 1) % 3), 80 + 40 * ((c + 2) % 3)], dtype=np.float64)
        stripes = np.sin((xx if c % 2 else yy) * (0.5 + 0.25 * c))[..., None] * 40
        for i, split in enumerate(splits):
            img = tint + stripes + rng.normal(0, 25, size=(size, size, 3))
            rows.append({"c": c, "split": split, "pixels": np.clip(img, 0, 255).astype(np.uint8), "i": i})
    writer = ShardWriter(uri, shard_mb=0.05, row_group_rows=rows_per_group)
    records = []
    for pos, r in enumerate(rows):
        label = r["c"] if not labels_override or pos not in labels_override else labels_override[pos]
        records.append({
            "sample_id": f"s{r['c']:02d}-{r['i']:04d}", "image": encode_png(r["pixels"]), "label": int(label),
            "label_name": f"class{r['c']}" if label >= 0 else "", "group": f"g{r['c']}-{r['i'] // 4}",
            "split": r["split"], "width": size, "height": size, "source": f"synthetic[{pos}]"})
    for rec in sorted(records, key=lambda r: r["sample_id"]):
        writer.write(rec)
    shards = writer.close()
    split_counts, label_counts = {}, {}
    for rec in records:
        split_counts[rec["split"]] = split_counts.get(rec["split"], 0) + 1
        label_counts[str(rec["label"])] = label_counts.get(str(rec["label"]), 0) + 1
    manifest = Manifest(uri=uri, shards=shards, label_names=[f"class{c}" for c in range(num_classes)],
                        split_counts=split_counts, label_counts=label_counts,
                        source_fingerprint=hashlib.sha256(f"synthetic/{seed}/{num_classes}".encode()).hexdigest(),
                        converter="synthetic")
    write_manifest(manifest)
    return uri


class TinyBackbone(nn.Module):
    """Two frozen conv levels (strides 2 and 4); weights from a fixed seed so the hash is stable."""

    def __init__(self, seed: int = 123) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.c1 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.c2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        self.requires_grad_(False)
        self.feature_info = [{"num_chs": 8, "reduction": 2}, {"num_chs": 16, "reduction": 4}]
        self.data_config = {"mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25), "interpolation": "bilinear",
                            "crop_pct": 1.0, "input_size": (3, 32, 32)}
        h = hashlib.sha256()
        for k, v in sorted(self.state_dict().items()):
            h.update(k.encode())
            h.update(v.numpy().tobytes())
        self.weights_hash = h.hexdigest()

    def train(self, mode: bool = True):  # frozen: always eval
        return super().train(False)

    def forward(self, x):
        f1 = F.gelu(self.c1(x))
        f2 = F.gelu(self.c2(f1))
        return [f1, f2]


class TinyEmbeddingModel(nn.Module):
    def __init__(self, dim: int = 16, dropout: float = 0.1, backbone_seed: int = 123) -> None:
        super().__init__()
        self.backbone = TinyBackbone(backbone_seed)
        self.proj = nn.ModuleList([nn.Conv2d(i["num_chs"], dim, 1) for i in self.backbone.feature_info])
        self.norm = nn.BatchNorm1d(2 * dim)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(2 * dim, dim)
        self.embedding_dim = dim

    def forward_features(self, images):
        with torch.no_grad():
            return self.backbone(images)

    def forward_head(self, features):
        pooled = [p(f).mean(dim=(2, 3)) for p, f in zip(self.proj, features)]
        return F.normalize(self.fc(self.drop(self.norm(torch.cat(pooled, 1)))), dim=1)

    def forward(self, images):
        return self.forward_head(self.forward_features(images))

    def trainable_state_dict(self):
        return {k: v for k, v in self.state_dict().items() if not k.startswith("backbone.")}

    def load_trainable_state_dict(self, sd):
        missing, unexpected = self.load_state_dict(sd, strict=False)
        missing = [k for k in missing if not k.startswith("backbone.")]
        if missing or unexpected:
            raise RuntimeError(f"missing {missing}, unexpected {unexpected}")


def tiny_build_model(cfg):
    # backbone "weights" other than "none" give a different frozen backbone (to test the --init guard)
    seed = 123 if cfg.model.backbone.weights == "none" else 7
    return TinyEmbeddingModel(dim=cfg.model.channels, backbone_seed=seed)
