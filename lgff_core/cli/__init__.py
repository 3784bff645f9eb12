"""`lgff` command line: one sub-command per pipeline stage, each a thin call into lgff_core.

Every stage module under `lgff_core.cli` exposes ``register(subparsers)``; it adds its parser(s) and sets
``func(args) -> int | None`` as the default. Errors caused by bad input (`LGFFError`) print one line and exit 2.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from ..errors import LGFFError

# sub-command modules, in the order they appear in --help
COMMAND_MODULES = ("models", "prep", "data", "train", "plan", "embed", "index", "evaluate", "report", "search",
                   "explain", "serve", "pipeline", "demo")


def add_config_args(parser: argparse.ArgumentParser, required: bool = False, default: str | None = None) -> None:
    """--config FILE|PRESET and repeated --set key=value (shared by every command that takes a config)."""
    parser.add_argument("--config", required=required, default=default,
                        help="YAML config file or preset name from configs/ (e.g. lgffem_cpu)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.epochs=2 (repeatable)")


def load_args_config(args: argparse.Namespace):
    """The run config from --config / --set; its `storage` limits are applied to every object-store call."""
    import dataclasses

    from .. import storage
    from ..config import load_config

    cfg = load_config(getattr(args, "config", None), getattr(args, "overrides", None) or [])
    storage.configure(**dataclasses.asdict(cfg.storage))
    return cfg


def apply_setting_flags(cfg, args: argparse.Namespace, flags: dict[str, str]):
    """`cfg` with the command-line flags that stand for a setting applied (``{"max_queries":
    "evaluate.max_queries"}``: ``--max-queries N`` sets it; an absent flag keeps the config's value, a given one,
    0 included, is used) and checked against the setting's range like --set: a bad value names the flag and key."""
    from ..config import apply_overrides, validate

    given = {key: getattr(args, dest) for dest, key in flags.items() if getattr(args, dest, None) is not None}
    if not given:
        return cfg
    origins = {key: "--" + dest.replace("_", "-") for dest, key in flags.items() if key in given}
    return validate(apply_overrides(cfg, given, check=False), "config", origins)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lgff", description="LGFF histopathology retrieval pipeline")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        module = importlib.import_module(f"{__name__}.{name}")
        module.register(sub)
    return parser


def setup_logging(verbose: int = 0, quiet: bool = False) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stderr, force=True)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for commands that relaunch themselves (train --nproc)
    setup_logging(args.verbose, args.quiet)
    try:
        code = args.func(args)
    except LGFFError as exc:
        print(f"lgff {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lgff {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(code or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
