"""`lgff models summary|bench|fetch-weights|export`: parameters per part and output shapes; forward speed; hub
weights to bake into the image (`make image BAKE_WEIGHTS=...`); the inference model of a training run
(`lgff models export RUN_OR_CHECKPOINT --out URI`: model.safetensors + model.json, no optimizer state, what embed /
search / explain / serve need)."""
from __future__ import annotations

import argparse

from . import add_config_args, load_args_config


def register(subparsers) -> None:
    parser = subparsers.add_parser("models", help="inspect the model zoo")
    sub = parser.add_subparsers(dest="models_command", metavar="SUBCOMMAND")
    sub.required = True
    summary = sub.add_parser("summary", help="parameters per part and output shapes of the configured model")
    add_config_args(summary, required=True)
    summary.add_argument("--image-size", type=int, default=224, help="input side in px (multiple of 32)")
    summary.add_argument("--num-classes", type=int, default=24,
                         help="classes of the Sub-center ArcFace loss counted in the summary (embedding models)")
    summary.set_defaults(func=run_summary)
    bench = sub.add_parser("bench", help="forward img/s in fp32 / channels_last / channels_last+bf16 (random batch)")
    add_config_args(bench, required=True)
    bench.add_argument("--batch-size", type=int, default=32)
    bench.add_argument("--image-size", type=int, default=224, help="input side in px (multiple of 32)")
    bench.add_argument("--iters", type=int, default=3, help="timed iterations per mode (after one warm-up)")
    bench.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    bench.add_argument("--baseline", action="store_true", help="benchmark the no-neck GeM baseline instead")
    bench.set_defaults(func=run_bench)
    fetch = sub.add_parser("fetch-weights", help="download a preset's timm hub weights to DIR/<timm name>.safetensors "
                                                 "(image build host; tasks then read them from LGFF_WEIGHTS_DIR)")
    add_config_args(fetch, required=True)
    fetch.add_argument("--out", required=True, help="directory (the image's weights dir, /opt/lgff/weights)")
    fetch.set_defaults(func=run_fetch_weights)
    export = sub.add_parser("export", help="write the inference model of a checkpoint (weights + model.json, no "
                                           "optimizer or ArcFace state) for embed / search / explain / serve")
    export.add_argument("checkpoint", help="checkpoint prefix, or a training output directory (its best/ is used)")
    export.add_argument("--out", required=True, help="output prefix (model.safetensors + model.json, sidecar last)")
    add_config_args(export)  # only its storage settings are used
    export.set_defaults(func=run_export)


def _fmt(n: int) -> str:
    return f"{n:,} ({n / 1e6:.2f}M)" if n >= 1e5 else f"{n:,}"


def run_summary(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from ..config import ConfigError
    from ..models import build_loss, build_model
    from ..models.summary import offline_weights, summarize

    cfg = load_args_config(args)
    if args.image_size <= 0 or args.image_size % 32:
        raise ConfigError(f"--image-size {args.image_size}: must be a positive multiple of 32")
    console = Console()
    spec = cfg.model.backbone.weights
    available, reason = offline_weights(spec, cfg.model.backbone.name)
    weights = spec if available else "none"
    model = build_model(cfg, weights=weights)
    loss = None
    if cfg.model.kind == "embedding":
        loss = build_loss(cfg, args.num_classes, model.embedding_dim)
    info = summarize(model, loss=loss, image_size=args.image_size)

    console.print(f"[bold]{cfg.name}[/bold]: {cfg.model.kind} model, backbone {cfg.model.backbone.name}, "
                  f"neck {cfg.model.neck} (C={cfg.model.channels}, {cfg.model.num_layers} layer(s))")
    if available:
        console.print(f"backbone weights: {reason}")
    else:
        console.print(f"[yellow]backbone weights {spec!r} unavailable offline ({reason}); built with weights "
                      f"'none' - parameter counts and shapes are unaffected[/yellow]")
    table = Table(title="parameters")
    for col in ("part", "params", "trainable", "frozen"):
        table.add_column(col, justify="left" if col == "part" else "right")
    for row in info["parts"]:
        table.add_row(row["part"], _fmt(row["params"]), _fmt(row["trainable"]), _fmt(row["frozen"]))
    console.print(table)
    by_part = {row["part"]: row["params"] for row in info["parts"]}
    if "neck" in by_part:
        console.print(f"neck: {_fmt(by_part['neck'])}; stem: {_fmt(by_part['stem'])}; "
                      f"neck + stem: {_fmt(by_part['neck'] + by_part['stem'])}")
    if loss is not None:
        console.print(f"loss: Sub-center ArcFace with {args.num_classes} classes (--num-classes), "
                      f"K={cfg.loss.num_subcenters}, s={cfg.loss.scale}, m={cfg.loss.margin_deg} deg")
    shapes = Table(title=f"output shapes for a 1x3x{args.image_size}x{args.image_size} input")
    shapes.add_column("tensor")
    shapes.add_column("shape", justify="right")
    for row in info["shapes"]:
        shapes.add_row(row["name"], "x".join(map(str, row["shape"])))
    console.print(shapes)
    return 0


def run_bench(args: argparse.Namespace) -> int:
    import torch
    from rich.console import Console
    from rich.table import Table

    from ..config import ConfigError
    from ..models import build_baseline, build_model
    from ..models.benchmark import benchmark_forward
    from ..models.summary import offline_weights

    cfg = load_args_config(args)
    if cfg.model.kind != "embedding":
        raise ConfigError(f"lgff models bench: needs an embedding model, config {cfg.name!r} has "
                          f"model.kind={cfg.model.kind!r}")
    if args.image_size <= 0 or args.image_size % 32 or args.batch_size <= 0 or args.iters <= 0:
        raise ConfigError("lgff models bench: --image-size must be a positive multiple of 32, "
                          "--batch-size and --iters positive")
    if args.threads:
        torch.set_num_threads(args.threads)
    available, reason = offline_weights(cfg.model.backbone.weights, cfg.model.backbone.name)
    weights = cfg.model.backbone.weights if available else "none"
    model = (build_baseline if args.baseline else build_model)(cfg, weights=weights)
    rows = benchmark_forward(model, batch_size=args.batch_size, image_size=args.image_size, iters=args.iters)
    console = Console()
    what = "GeM baseline" if args.baseline else "LGFFEM"
    table = Table(title=f"{cfg.name} {what}: batch {args.batch_size}, {args.image_size} px, "
                        f"{torch.get_num_threads()} thread(s), best / median of {args.iters}")
    for col in ("mode", "img/s (best)", "img/s (median)", "min cosine vs fp32"):
        table.add_column(col, justify="left" if col == "mode" else "right")
    for row in rows:
        table.add_row(row["mode"], f"{row['best_img_per_s']:.1f}", f"{row['median_img_per_s']:.1f}",
                      f"{row['min_cosine_vs_fp32']:.5f}")
    console.print(table)
    if not available:
        console.print(f"[yellow]backbone weights unavailable offline ({reason}); timed with random weights[/yellow]")
    return 0


def run_fetch_weights(args: argparse.Namespace) -> int:
    from ..models.backbone import save_timm_weights

    cfg = load_args_config(args)
    spec, name = cfg.model.backbone.weights, cfg.model.backbone.name
    if spec != "timm":
        print(f"{cfg.name}: model.backbone.weights={spec!r} is not a hub download; nothing to fetch")
        return 0
    print(f"{cfg.name}: {name} -> {save_timm_weights(name, args.out)}")
    return 0


def run_export(args: argparse.Namespace) -> int:
    from ..train.checkpoint import MODEL_FILE, export_model

    load_args_config(args)
    sidecar = export_model(args.checkpoint, args.out)
    print(f"{sidecar.get('name')}: epoch {sidecar.get('epoch')}, {sidecar['files'][MODEL_FILE]['bytes']} bytes of "
          f"weights -> {args.out}")
    return 0
