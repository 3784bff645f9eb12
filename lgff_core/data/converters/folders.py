"""Converters for image-file trees: ImageFolder (one sub-folder per class) and Kimia Path24C.

Kimia Path24C layout (DESIGN.md section 4): ``train/`` and ``test/``, each with one folder per scan ``s0``..``s23``;
label id = scan number, group = scan, split = top folder.
ImageFolder layout: ``SRC/<class>/<image>``, or with split folders ``SRC/{train,val,test}/<class>/<image>``;
label ids = sorted class names, group = the image's relative path (each image is its own source), split = the
split folder, else ``--split-fractions`` (seeded hash per group) or ``--split`` (default "train").

Image bytes are kept as-is for JPEG/PNG, other formats become lossless PNG. sample_id = relative path.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
from typing import Iterator, Optional
from pathlib import Path

from ...errors import DataError
from ..convert import ConvertOptions, RowError, Task, fingerprint, write_dataset
from ..images import DEFAULT_MAX_PIXELS, ImageCheckError, probe_image
from ..shards import Manifest

__all__ = ["convert_imagefolder", "convert_kimia", "IMAGE_EXTENSIONS", "load_image_file"]

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp")
SPLIT_NAMES = ("train", "val", "test")
KIMIA_SCAN_RE = re.compile(r"^s(\d+)$")


def load_image_file(path: str, label: int, label_name: str, group: str, split: str, check: str,
                    max_pixels: int = DEFAULT_MAX_PIXELS) -> dict:
    """Loader: one image file -> row (original bytes for JPEG/PNG)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise RowError(f"cannot read ({exc.strerror or exc})") from None
    try:
        stored, width, height = probe_image(data, check=check, max_pixels=max_pixels)
    except ImageCheckError as exc:
        raise RowError(str(exc)) from None
    return {"image": stored, "label": label, "label_name": label_name, "group": group, "split": split,
            "width": width, "height": height}


def _walk_images(folder: str | os.PathLike, _seen: tuple = ()) -> Iterator[tuple[str, int]]:
    """``(path, size)`` of the image files under `folder`, in the string order of their paths.

    Entries of a directory are sorted by name with "/" appended to sub-directory names, which makes a depth-first
    walk yield full paths in sorted order. Memory: one directory listing at a time. Symlinked folders are
    followed, but a folder that is its own ancestor (a symlink loop) is a `DataError` naming the link.
    """
    try:
        st = os.stat(folder)
        seen = _seen + ((st.st_dev, st.st_ino),)
        entries = []
        with os.scandir(folder) as it:
            for e in it:
                if e.name.startswith("."):
                    continue
                if e.is_dir():
                    entries.append((e.name + "/", e))
                elif e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS):
                    entries.append((e.name, e))
    except OSError as exc:
        raise DataError(f"{folder}: cannot list ({exc.strerror or exc}; a symlink loop?)") from None
    entries.sort(key=lambda x: x[0])
    for key, e in entries:
        if key.endswith("/"):
            try:
                st = e.stat()
            except OSError as exc:
                raise DataError(f"{e.path}: cannot read ({exc.strerror or exc}; a symlink loop?)") from None
            if (st.st_dev, st.st_ino) in seen:
                raise DataError(f"{e.path}: symlink loop (links back to {os.path.realpath(e.path)})")
            yield from _walk_images(e.path, seen)
        else:
            try:
                yield e.path, e.stat().st_size
            except OSError as exc:
                raise DataError(f"{e.path}: cannot read ({exc.strerror or exc})") from None


def _class_dirs(folder: Path) -> list[Path]:
    # same key as _walk_images so that split / class / file order is the string order of sample ids
    return sorted((p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")),
                  key=lambda p: p.name + "/")


def _require_dir(src: str | os.PathLike, what: str) -> Path:
    path = Path(src)
    if not path.is_dir():
        raise DataError(f"{src}: {what} is not a directory")
    return path


Entry = tuple  # (split, class dir, label, label_name, group rule: "class" | "image")


def _scan_tree(src: Path, entries: list[Entry], skipped: list[dict], options: ConvertOptions
               ) -> tuple[list[Entry], str, int]:
    """Pass 1: fingerprint of every (relative path, size), image count, and the class folders that have images
    (empty ones fail the run or are recorded as skipped). Constant memory."""
    listing = hashlib.sha256()
    prefix = len(str(src).rstrip(os.sep)) + 1
    kept, total = [], 0
    for entry in entries:
        class_dir, label_name = entry[1], entry[3]
        count = 0
        for path, size in _walk_images(class_dir):
            listing.update(f"{path[prefix:]}\t{size}\n".encode())
            count += 1
        if count == 0:
            msg = f"{class_dir}: class folder {label_name!r} has no images"
            if options.on_error == "fail":
                raise DataError(msg)
            skipped.append({"input": str(class_dir.relative_to(src)), "reason": msg})
            continue
        kept.append(entry)
        total += count
    return kept, listing.hexdigest(), total


def _iter_tasks(src: Path, entries: list[Entry], check: str,
                split_fractions: Optional[dict[str, float]] = None, seed: int = 0,
                max_pixels: int = DEFAULT_MAX_PIXELS) -> Iterator[Task]:
    """Pass 2: one Task per image, lazily, in sample_id order."""
    prefix = len(str(src).rstrip(os.sep)) + 1
    for split, class_dir, label, label_name, group_rule in entries:
        for path, _ in _walk_images(class_dir):
            rel = path[prefix:].replace(os.sep, "/")
            group = label_name if group_rule == "class" else rel.rsplit(".", 1)[0]
            if split_fractions:
                split = hashed_split(group, seed, split_fractions)
            yield Task(sample_id=rel, source=path, loader=load_image_file,
                       args=(path, label, label_name, group, split, check, max_pixels))


def parse_split_fractions(text: str) -> dict[str, float]:
    """``"train=0.8,val=0.1,test=0.1"`` -> {"train": 0.8, "val": 0.1, "test": 0.1} (must sum to 1)."""
    out: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep or not name.strip() or out[name.strip()] < 0:
            raise DataError(f"--split-fractions {text!r}: expected NAME=FRACTION,... e.g. train=0.8,val=0.1,test=0.1")
    if not out or abs(sum(out.values()) - 1.0) > 1e-6:
        raise DataError(f"--split-fractions {text!r}: fractions must sum to 1")
    return out


def hashed_split(key: str, seed: int, fractions: dict[str, float]) -> str:
    """Deterministic split of `key` (a group): a seeded sha256 mapped to [0, 1) against cumulative fractions."""
    u = int.from_bytes(hashlib.sha256(f"{seed}/{key}".encode()).digest()[:8], "big") / 2.0 ** 64
    acc = 0.0
    for name, frac in fractions.items():
        acc += frac
        if u < acc:
            return name
    return list(fractions)[-1]


def convert_imagefolder(
    src: str | os.PathLike,
    out: str,
    options: ConvertOptions,
    split: str = "train",
    check: str = "fast",
    split_fractions: Optional[dict[str, float]] = None,
) -> Manifest:
    """ImageFolder tree -> dataset (see the module docstring).

    Without split folders every image gets `split`, or, with `split_fractions`, a split drawn per group (= per
    image) by a seeded hash (`hashed_split`), so the same seed always gives the same split.
    """
    root = _require_dir(src, "--src")
    top = _class_dirs(root)
    if top and all(p.name in SPLIT_NAMES for p in top):
        split_dirs = [(p.name, p) for p in top]
        split_fractions = None
    else:
        split_dirs = [(split, root)]
    class_names = sorted({c.name for _, d in split_dirs for c in _class_dirs(d)})
    if not class_names:
        raise DataError(f"{src}: no class folders (expected SRC/<class>/<image> or SRC/<split>/<class>/<image>)")
    label_of = {name: i for i, name in enumerate(class_names)}
    entries = [(s, c, label_of[c.name], c.name, "image") for s, d in split_dirs for c in _class_dirs(d)]
    skipped: list[dict] = []
    entries, listing, total = _scan_tree(root, entries, skipped, options)
    params = {"split": split, "check": check, "shard_mb": options.shard_mb}
    if split_fractions:
        params.update(split_fractions=split_fractions, seed=options.seed)
    tasks = _iter_tasks(root, entries, check, split_fractions, options.seed, options.max_pixels)
    return write_dataset(
        out, tasks, converter="imagefolder", params=params,
        source_fingerprint=fingerprint("imagefolder", params, [listing]), total=total,
        label_names=class_names, options=options, skipped=skipped,
        extra={"group": "each image is its own group (relative path without extension)"},
    )


def convert_kimia(src: str | os.PathLike, out: str, options: ConvertOptions, check: str = "fast") -> Manifest:
    """Kimia Path24C tree (train/ and test/ with s0..s23) -> dataset; label = scan id, group = scan."""
    root = _require_dir(src, "--src")
    split_dirs = [(name, root / name) for name in ("test", "train") if (root / name).is_dir()]  # sample_id order
    if not split_dirs:
        raise DataError(f"{src}: no train/ or test/ folder (Kimia Path24C layout: train/s0..s23, test/s0..s23)")
    scans: dict[str, int] = {}
    for _, d in split_dirs:
        for c in _class_dirs(d):
            m = KIMIA_SCAN_RE.match(c.name)
            if not m:
                raise DataError(f"{c}: unexpected folder (Kimia scan folders are named s0..s23)")
            scans[c.name] = int(m.group(1))
    if not scans:
        raise DataError(f"{src}: no scan folders s0..s23 under train/ or test/")
    label_names = [f"s{i}" for i in range(max(scans.values()) + 1)]
    entries = [(s, c, scans[c.name], c.name, "class") for s, d in split_dirs for c in _class_dirs(d)]
    skipped: list[dict] = []
    entries, listing, total = _scan_tree(root, entries, skipped, options)
    params = {"check": check, "shard_mb": options.shard_mb}
    return write_dataset(
        out, _iter_tasks(root, entries, check, max_pixels=options.max_pixels), converter="kimia", params=params,
        source_fingerprint=fingerprint("kimia", params, [listing]), total=total,
        label_names=label_names, options=options, skipped=skipped,
        extra={"group": "scan (s0..s23)", "label": "scan id"},
    )

