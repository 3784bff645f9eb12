"""Datasets: the Parquet shard format + manifest (`shards`), image coding (`images`), the streaming torch dataset
(`dataset`, imports torch), converters from source layouts (`converters`, run by `lgff prep`) and transforms."""
from .images import decode_image, encode_png
from .shards import (
    COCO_SCHEMA,
    IMAGE_SCHEMA,
    MANIFEST_NAME,
    Manifest,
    ShardInfo,
    iter_record_batches,
    iter_row_range,
    read_manifest,
    read_table,
    row_subset,
    shard_subset,
    verify_dataset,
)

__all__ = [
    "COCO_SCHEMA",
    "IMAGE_SCHEMA",
    "MANIFEST_NAME",
    "Manifest",
    "ShardInfo",
    "decode_image",
    "encode_png",
    "iter_record_batches",
    "iter_row_range",
    "read_manifest",
    "read_table",
    "row_subset",
    "shard_subset",
    "verify_dataset",
]
