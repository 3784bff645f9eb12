"""`ShardedImageDataset`: a torch IterableDataset streaming a Parquet shard dataset (DESIGN.md section 4).

Work units are Parquet row groups (sizes from the manifest). For each epoch the unit list is (optionally) shuffled
with a generator seeded by ``(seed, epoch)``, then dealt round-robin over ``world_size * num_workers`` consumers
(torch.distributed rank x DataLoader worker), so every row is read exactly once per epoch across all consumers.
An optional shuffle buffer (seeded by ``(seed, epoch, consumer)``) mixes rows across units. Same seed + epoch +
consumer layout -> same order. Memory: one row group plus the shuffle buffer.

Yields ``{"image": Tensor | PIL.Image, "label": int, "sample_id": str, "group": str, "index": int}``; ``index`` is
the row's global position in the dataset (stable across epochs: use it to key a feature cache).
Every shard is checked against the manifest's sha256 once (in the constructing process, `verify_shard`) and an
image that cannot be decoded, or declares more than `max_pixels`, is a one-line `DataError` naming its sample_id.
Note: consumers can receive different numbers of rows (units differ in size); DDP training loops that need equal
step counts should bound steps per epoch.
"""
from __future__ import annotations

import random
from typing import Callable, Iterator, Optional, Sequence

import torch
from torch.utils.data import IterableDataset, get_worker_info

from .images import DEFAULT_MAX_PIXELS, decode_image
from .shards import Manifest, open_shard, read_manifest, verify_shard

__all__ = ["ShardedImageDataset", "consumer_info"]


def consumer_info() -> tuple[int, int]:
    """``(consumer_id, num_consumers)`` over distributed ranks x DataLoader workers."""
    rank, world = 0, 1
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    info = get_worker_info()
    wid, nworkers = (info.id, info.num_workers) if info is not None else (0, 1)
    return rank * nworkers + wid, world * nworkers


class ShardedImageDataset(IterableDataset):
    def __init__(
        self,
        uri: str,
        split: Optional[str] = None,
        transform: Optional[Callable] = None,
        shuffle: bool = False,
        shuffle_buffer: int = 1024,
        seed: int = 0,
        shards: Optional[Sequence[int]] = None,
        decode: bool = True,
        units: Optional[Sequence[tuple[int, int]]] = None,
        max_pixels: Optional[int] = DEFAULT_MAX_PIXELS,
    ):
        self.uri = str(uri).rstrip("/")
        self.manifest: Manifest = read_manifest(self.uri)
        self.split = split
        self.transform = transform
        self.shuffle = shuffle
        self.shuffle_buffer = max(1, int(shuffle_buffer))
        self.seed = int(seed)
        self.decode = decode
        self.max_pixels = max_pixels
        self.epoch = 0
        self.shard_indices = list(range(self.manifest.num_shards)) if shards is None else list(shards)
        for si in self.shard_indices:  # once, here: DataLoader workers then read what was verified
            verify_shard(self.manifest, si)
        offsets = self.manifest.shard_offsets()
        # (shard index, row group index, global index of the group's first row)
        self.units: list[tuple[int, int, int]] = []
        for si in self.shard_indices:
            start = offsets[si]
            for gi, n in enumerate(self.manifest.shards[si].row_groups):
                self.units.append((si, gi, start))
                start += n
        if units is not None:  # only these (shard index, row group) units: one work block of the pipelines' plan
            wanted = {(int(si), int(gi)) for si, gi in units}
            self.units = [u for u in self.units if (u[0], u[1]) in wanted]
            self.shard_indices = sorted({si for si, _ in wanted})
            self._block_rows = sum(self.manifest.shards[si].row_groups[gi] for si, gi in wanted)
        else:
            self._block_rows = None
        self.label_names = list(self.manifest.label_names)

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        if self._block_rows is not None and self.split is None:
            return self._block_rows
        total = 0
        for si in self.shard_indices:
            info = self.manifest.shards[si]
            total += info.num_rows if self.split is None else info.split_counts.get(self.split, 0)
        return total

    def _my_units(self) -> list[tuple[int, int, int]]:
        units = list(self.units)
        if self.shuffle:
            random.Random(f"{self.seed}/{self.epoch}").shuffle(units)
        cid, n = consumer_info()
        return units[cid::n]

    def _iter_rows(self) -> Iterator[dict]:
        columns = ["sample_id", "image" if self.decode else None, "label", "group", "split"]
        columns = [c for c in columns if c]
        current, pf = None, None
        for si, gi, start in self._my_units():
            if si != current:
                pf = open_shard(self.manifest, si)
                current = si
            table = pf.read_row_group(gi, columns=columns)
            cols = {c: table.column(c).to_pylist() for c in columns if c != "image"}
            images = table.column("image") if self.decode else None
            for r in range(table.num_rows):
                if self.split is not None and cols["split"][r] != self.split:
                    continue
                yield {
                    "image": images[r].as_py() if images is not None else None,
                    "label": int(cols["label"][r]),
                    "sample_id": cols["sample_id"][r],
                    "group": cols["group"][r],
                    "index": start + r,
                }

    def _finish(self, row: dict) -> dict:
        if self.decode:
            image = decode_image(row["image"], self.max_pixels, row["sample_id"])
            row["image"] = self.transform(image) if self.transform is not None else image
        else:
            del row["image"]
        return row

    def __iter__(self) -> Iterator[dict]:
        rows = self._iter_rows()
        if not self.shuffle or self.shuffle_buffer <= 1:
            for row in rows:
                yield self._finish(row)
            return
        cid, _ = consumer_info()
        rng = random.Random(f"{self.seed}/{self.epoch}/{cid}")
        buffer: list[dict] = []
        for row in rows:
            if len(buffer) < self.shuffle_buffer:
                buffer.append(row)
                continue
            j = rng.randrange(len(buffer))
            out, buffer[j] = buffer[j], row
            yield self._finish(out)
        rng.shuffle(buffer)
        for row in buffer:
            yield self._finish(row)
