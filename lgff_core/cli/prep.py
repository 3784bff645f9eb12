"""`lgff prep <source>`: convert a source layout into a Parquet shard dataset (DESIGN.md section 4).

    lgff prep kimia       --src DIR --out URI
    lgff prep pannuke     --src DIR --out URI [--mode tissue|nuclei]
    lgff prep coco        --images DIR --annotations FILE --out URI
    lgff prep imagefolder --src DIR --out URI
    lgff prep samples     --out URI            (histolytics-nuclei, histolytics-tissue, nuclei-coco under URI)

All take --shard-mb, --workers, --seed, --on-error fail|skip (defaults from the config's `data` section).
"""
from __future__ import annotations

import argparse

from . import add_config_args, load_args_config


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output dataset URI (local path, file:// or s3://bucket/prefix)")
    p.add_argument("--shard-mb", type=float, default=None, help="target shard size in MB (default: data.shard_mb)")
    p.add_argument("--workers", type=int, default=None, help="decode/encode processes (default: data.workers)")
    p.add_argument("--seed", type=int, default=None, help="seed for split assignment (default: config seed)")
    p.add_argument("--on-error", choices=("fail", "skip"), default=None,
                   help="bad input: fail (default) or skip and record it in the manifest")
    p.add_argument("--check", choices=("fast", "decode"), default=None,
                   help="image check: fast = JPEG/PNG structure + end marker, catches truncation (default: "
                        "data.check = fast); decode = also run the full decoder")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_config_args(p)


def register(subparsers) -> None:
    prep = subparsers.add_parser("prep", help="convert source data into a Parquet shard dataset",
                                 description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = prep.add_subparsers(dest="source", metavar="SOURCE")
    sub.required = True

    p = sub.add_parser("kimia", help="Kimia Path24C: train/ and test/ with s0..s23")
    p.add_argument("--src", required=True)
    _common(p)
    p.set_defaults(func=_run)

    p = sub.add_parser("pannuke", help="PanNuke folds: Fold k/images/foldk/images.npy, types.npy, masks")
    p.add_argument("--src", required=True)
    p.add_argument("--mode", choices=("tissue", "nuclei"), default="tissue",
                   help="tissue: whole patches by tissue type; nuclei: nucleus crops by cell type")
    p.add_argument("--crop-size", type=int, default=None, help="nuclei crop size (default: data.crop_size)")
    p.add_argument("--min-area", type=int, default=10, help="smallest nucleus (pixels) cropped in nuclei mode")
    _common(p)
    p.set_defaults(func=_run)

    p = sub.add_parser("coco", help="COCO images dir + instances JSON")
    p.add_argument("--images", required=True)
    p.add_argument("--annotations", required=True)
    p.add_argument("--split", default=None, help="split name (default: from the JSON file name, else train)")
    _common(p)
    p.set_defaults(func=_run)

    p = sub.add_parser("imagefolder", help="one sub-folder per class (optionally under train/ val/ test/)")
    p.add_argument("--src", required=True)
    p.add_argument("--split", default="train", help="split of a tree without split folders (default train)")
    p.add_argument("--split-fractions", default=None, metavar="NAME=F,...",
                   help="for a tree without split folders: split each image by a seeded hash, "
                        "e.g. train=0.8,val=0.1,test=0.1")
    _common(p)
    p.set_defaults(func=_run)

    p = sub.add_parser("samples", help="real sample sets from the installed histolytics + stardist packages")
    p.add_argument("--sets", nargs="+", default=None, help="subset of histolytics-nuclei histolytics-tissue "
                                                           "nuclei-coco (default: all)")
    _common(p)
    p.set_defaults(func=_run)


def _options(args, cfg):
    from ..data.convert import ConvertOptions

    progress = None
    if not args.no_progress:
        from tqdm import tqdm

        def progress(it, total=None):
            return tqdm(it, total=total, desc=f"prep {args.source}", unit="img", mininterval=1.0)

    return ConvertOptions(
        shard_mb=args.shard_mb if args.shard_mb is not None else cfg.data.shard_mb,
        workers=args.workers if args.workers is not None else cfg.data.workers,
        seed=args.seed if args.seed is not None else cfg.seed,
        on_error=args.on_error or cfg.data.on_error,
        max_pixels=cfg.data.max_pixels,
        progress=progress,
    )


def _print_summary(name: str, manifest) -> None:
    from rich.console import Console

    console = Console(stderr=False)
    skipped = f", {len(manifest.skipped)} skipped" if manifest.skipped else ""
    console.print(f"[bold]{name}[/bold] -> {manifest.uri}: {manifest.num_rows} rows, {manifest.num_shards} shard(s), "
                  f"{manifest.total_bytes / 2**20:.1f} MB, splits {manifest.split_counts}{skipped}")


def _run(args) -> int:
    cfg = load_args_config(args)
    options = _options(args, cfg)
    args.check = args.check or cfg.data.check
    if args.source == "kimia":
        from ..data.converters.folders import convert_kimia

        _print_summary("kimia", convert_kimia(args.src, args.out, options, check=args.check))
    elif args.source == "imagefolder":
        from ..data.converters.folders import convert_imagefolder

        from ..data.converters.folders import parse_split_fractions

        fractions = parse_split_fractions(args.split_fractions) if args.split_fractions else None
        _print_summary("imagefolder", convert_imagefolder(args.src, args.out, options, split=args.split,
                                                          check=args.check, split_fractions=fractions))
    elif args.source == "pannuke":
        from ..data.converters.pannuke import convert_pannuke

        crop = args.crop_size if args.crop_size is not None else cfg.data.crop_size
        _print_summary(f"pannuke-{args.mode}", convert_pannuke(args.src, args.out, options, mode=args.mode,
                                                               crop_size=crop, min_area=args.min_area))
    elif args.source == "coco":
        from ..data.converters.coco import convert_coco

        _print_summary("coco", convert_coco(args.images, args.annotations, args.out, options, split=args.split,
                                            check=args.check))
    elif args.source == "samples":
        from ..data.converters.samples import SAMPLE_SETS, convert_samples

        manifests = convert_samples(args.out, options, crop_size=cfg.data.crop_size, tile_size=cfg.data.tile_size,
                                    sets=tuple(args.sets or SAMPLE_SETS))
        for name, m in manifests.items():
            _print_summary(name, m)
    return 0
