"""PanNuke -> dataset, in two modes (DESIGN.md section 4).

Layout: ``Fold k/images/foldk/images.npy`` (N, 256, 256, 3) float64 0..255, ``Fold k/images/foldk/types.npy`` (N,)
tissue names (19 kinds), ``Fold k/masks/foldk/masks.npy`` (N, 256, 256, 6): channels 0-4 = Neoplastic,
Inflammatory, Connective, Dead, Epithelial instance ids, channel 5 = background.

- ``tissue``: one row per patch (lossless PNG of the rounded uint8 pixels), label = tissue type (sorted names),
  group = patch (``fold1/00012``).
- ``nuclei``: one row per nucleus instance of channels 0-4: a ``crop_size`` square centred on the instance's
  centroid (shifted inside the patch at borders), label = cell type, group = source patch.

Split per fold (default fold 1 = train, 2 = val, 3 = test). Arrays are memory-mapped (``np.load(mmap_mode='r')``)
and read one patch at a time, so memory does not depend on the fold size.
"""
from __future__ import annotations

import functools
import logging
import os
import re
from pathlib import Path

import numpy as np

from ...errors import DataError
from ..convert import ConvertOptions, RowError, Task, fingerprint, write_dataset
from ..images import encode_png
from ..shards import Manifest

__all__ = ["convert_pannuke", "CELL_TYPES", "DEFAULT_FOLD_SPLITS", "find_folds"]

log = logging.getLogger(__name__)

CELL_TYPES = ("Neoplastic", "Inflammatory", "Connective", "Dead", "Epithelial")
DEFAULT_FOLD_SPLITS = {1: "train", 2: "val", 3: "test"}
FOLD_RE = re.compile(r"^Fold (\d+)$")


@functools.lru_cache(maxsize=8)
def _mmap(path: str) -> np.ndarray:
    return np.load(path, mmap_mode="r", allow_pickle=False)


def _open_npy(path: Path) -> np.ndarray:
    if not path.is_file():
        raise DataError(f"{path}: missing (PanNuke layout: Fold k/images/foldk/images.npy, types.npy, "
                        "Fold k/masks/foldk/masks.npy)")
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise DataError(f"{path}: not a readable .npy array (truncated or corrupt?): {exc}") from None


def _read_types(path: Path) -> list[str]:
    if not path.is_file():
        raise DataError(f"{path}: missing")
    try:
        arr = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise DataError(f"{path}: not a readable .npy array of tissue names (truncated, or pickled objects?): "
                        f"{exc}") from None
    if arr.ndim != 1 or arr.dtype.kind not in "US":
        raise DataError(f"{path}: expected a 1-d array of strings, got shape {arr.shape} dtype {arr.dtype}")
    return [str(x.decode() if isinstance(x, bytes) else x) for x in arr]


def find_folds(src: Path) -> list[tuple[int, Path]]:
    folds = []
    for p in sorted(src.iterdir()):
        m = FOLD_RE.match(p.name)
        if p.is_dir() and m:
            folds.append((int(m.group(1)), p))
    if not folds:
        raise DataError(f"{src}: no 'Fold k' folders (PanNuke layout: Fold 1/images/fold1/images.npy ...)")
    return sorted(folds)


def _patch_pixels(images_path: str, index: int) -> np.ndarray:
    patch = np.asarray(_mmap(images_path)[index], dtype=np.float64)
    if not np.isfinite(patch).all():
        raise RowError(f"patch {index} has non-finite pixel values")
    return np.clip(np.rint(patch), 0, 255).astype(np.uint8)


def load_tissue_patch(images_path: str, index: int, label: int, label_name: str, group: str, split: str) -> dict:
    pixels = _patch_pixels(images_path, index)
    return {"image": encode_png(pixels), "label": label, "label_name": label_name, "group": group, "split": split,
            "width": pixels.shape[1], "height": pixels.shape[0]}


def _crop_box(cy: float, cx: float, size: int, height: int, width: int) -> tuple[int, int, int, int]:
    """Top-left-inclusive box of `size` centred on (cy, cx), shifted to lie inside the image."""
    y0 = int(round(cy - size / 2))
    x0 = int(round(cx - size / 2))
    y0 = min(max(0, y0), max(0, height - size))
    x0 = min(max(0, x0), max(0, width - size))
    return y0, x0, min(height, y0 + size), min(width, x0 + size)


def load_nuclei_crops(images_path: str, masks_path: str, index: int, sample_prefix: str, group: str, split: str,
                      crop_size: int, min_area: int) -> list[dict]:
    pixels = _patch_pixels(images_path, index)
    masks = np.asarray(_mmap(masks_path)[index])
    height, width = pixels.shape[:2]
    rows = []
    for channel, cell_type in enumerate(CELL_TYPES):
        inst = np.rint(masks[..., channel]).astype(np.int64)
        for inst_id in np.unique(inst):
            if inst_id <= 0:
                continue
            ys, xs = np.nonzero(inst == inst_id)
            if ys.size < min_area:
                continue
            y0, x0, y1, x1 = _crop_box(ys.mean(), xs.mean(), crop_size, height, width)
            crop = pixels[y0:y1, x0:x1]
            rows.append({
                "sample_id": f"{sample_prefix}/{channel}-{cell_type.lower()}-{int(inst_id):04d}",
                "image": encode_png(crop), "label": channel, "label_name": cell_type, "group": group,
                "split": split, "width": crop.shape[1], "height": crop.shape[0],
                "source": f"{images_path}[{index}] {cell_type} instance {int(inst_id)}",
            })
    return rows


def convert_pannuke(
    src: str | os.PathLike,
    out: str,
    options: ConvertOptions,
    mode: str = "tissue",
    crop_size: int = 64,
    min_area: int = 10,
    fold_splits: dict[int, str] | None = None,
) -> Manifest:
    """PanNuke folds -> dataset (see the module docstring)."""
    if mode not in ("tissue", "nuclei"):
        raise DataError(f"--mode must be 'tissue' or 'nuclei', got {mode!r}")
    root = Path(src)
    if not root.is_dir():
        raise DataError(f"{src}: --src is not a directory")
    fold_splits = dict(DEFAULT_FOLD_SPLITS if fold_splits is None else fold_splits)
    folds = []
    listing = []
    for k, fold_dir in find_folds(root):
        images_path = fold_dir / "images" / f"fold{k}" / "images.npy"
        types_path = fold_dir / "images" / f"fold{k}" / "types.npy"
        masks_path = fold_dir / "masks" / f"fold{k}" / "masks.npy"
        images = _open_npy(images_path)
        if images.ndim != 4 or images.shape[3] != 3:
            raise DataError(f"{images_path}: expected shape (N, H, W, 3), got {images.shape}")
        types = _read_types(types_path)
        if len(types) != images.shape[0]:
            raise DataError(f"{types_path}: {len(types)} tissue names but {images_path.name} has "
                            f"{images.shape[0]} patches")
        if mode == "nuclei":
            masks = _open_npy(masks_path)
            if masks.ndim != 4 or masks.shape[:3] != images.shape[:3] or masks.shape[3] != 6:
                raise DataError(f"{masks_path}: expected shape {images.shape[:3] + (6,)} to match "
                                f"{images_path.name}, got {masks.shape}")
        folds.append((k, images_path, masks_path, types, images.shape[0]))
        listing.append((f"Fold {k}", images_path.stat().st_size, types_path.stat().st_size,
                        masks_path.stat().st_size if mode == "nuclei" else 0, list(images.shape)))
    tissue_names = sorted({t for f in folds for t in f[3]})
    tissue_label = {name: i for i, name in enumerate(tissue_names)}
    tasks = []
    for k, images_path, masks_path, types, n in folds:
        split = fold_splits.get(k, "train")
        for i in range(n):
            patch_id = f"fold{k}/{i:05d}"
            source = f"{images_path}[{i}]"
            if mode == "tissue":
                tasks.append(Task(patch_id, source, load_tissue_patch,
                                  (str(images_path), i, tissue_label[types[i]], types[i], patch_id, split)))
            else:
                tasks.append(Task(patch_id, source, load_nuclei_crops,
                                  (str(images_path), str(masks_path), i, patch_id, patch_id, split, crop_size,
                                   min_area)))
    params = {"mode": mode, "shard_mb": options.shard_mb,
              "fold_splits": {str(k): v for k, v in sorted(fold_splits.items())}}
    if mode == "nuclei":
        params.update(crop_size=crop_size, min_area=min_area)
    label_names = tissue_names if mode == "tissue" else list(CELL_TYPES)
    return write_dataset(
        out, tasks, converter=f"pannuke-{mode}", params=params,
        source_fingerprint=fingerprint(f"pannuke-{mode}", params, listing),
        label_names=label_names, options=options,
        extra={"group": "source patch (foldK/index)",
               "label": "tissue type" if mode == "tissue" else "cell type (mask channel 0-4)"},
    )
