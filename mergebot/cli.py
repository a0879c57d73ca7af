"""The `mergebot` command. Errors are caught here, reported once as one line, and become the exit code."""

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

from mergebot import log
from mergebot.config import Located, MergeConfig, load_merge_config, parse_merge
from mergebot.errors import ConfigError, MergebotError


def _quick_config(args: argparse.Namespace) -> MergeConfig:
    """`--method linear A:0.6 B:0.4 OUT`: sources as model[:weight], other parameters as --set key=value."""
    models = []
    for source in args.sources:
        model, sep, weight = source.rpartition(":")
        if sep and not Path(source).exists():
            try:
                models.append({"model": model, "parameters": {"weight": float(weight)}})
                continue
            except ValueError:
                pass
        models.append({"model": source})
    raw: dict[str, Any] = {"merge_method": args.method, "models": models, "parameters": {}}
    for assignment in args.set or []:
        key, sep, value = assignment.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {assignment}: expected key=value")
        raw["parameters"][key] = yaml.safe_load(value)
    for key in ("base_model", "dtype", "tokenizer_source", "out_shard_size"):
        if getattr(args, key) is not None:
            raw[key] = getattr(args, key)
    return parse_merge(raw, Located(Path("<command line>"), ""))


def _merge(args: argparse.Namespace) -> int:
    from mergebot.inputs import resolve_inputs
    from mergebot.merge.engine import run_merge
    from mergebot.progress import ShardProgress

    if args.method:
        if len(args.paths) < 2:
            raise ConfigError("merge --method: give model[:weight] sources and then OUT_DIR")
        args.sources, out_dir = args.paths[:-1], Path(args.paths[-1])
        config = _quick_config(args)
    else:
        if len(args.paths) != 2:
            raise ConfigError("merge: give CONFIG OUT_DIR (or --method with model[:weight] sources)")
        config = load_merge_config(Path(args.paths[0]), args.target)
        out_dir = Path(args.paths[1])
    models = resolve_inputs(config)
    result = run_merge(config, models, out_dir, ShardProgress())
    log.get("merge").info(
        "merged",
        out_dir=str(result.out_dir),
        shards=len(result.shards),
        computed=len(result.computed),
        reused=len(result.reused),
    )
    return 0


def _devhub(args: argparse.Namespace) -> int:
    from mergebot.hub.devhub import serve

    serve(Path(args.root), args.host, args.port)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mergebot", description=__doc__)
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    commands = parser.add_subparsers(dest="command", required=True)

    merge = commands.add_parser("merge", help="merge models shard by shard into OUT_DIR (resumable)")
    merge.add_argument("paths", nargs="+", metavar="CONFIG OUT_DIR | SOURCE... OUT_DIR")
    merge.add_argument("--target", help="which [[targets]] entry of a TOML config to merge")
    merge.add_argument("--method", help="quick form without a config file, e.g. linear")
    merge.add_argument("--set", action="append", metavar="KEY=VALUE", help="a method parameter (quick form)")
    merge.add_argument("--base-model", dest="base_model")
    merge.add_argument("--dtype")
    merge.add_argument("--tokenizer-source", dest="tokenizer_source")
    merge.add_argument("--out-shard-size", dest="out_shard_size")
    merge.set_defaults(handler=_merge)

    devhub = commands.add_parser("devhub", help="run the local Hub server in the foreground")
    devhub.add_argument("--root", required=True, help="directory that holds the repos")
    devhub.add_argument("--host", default="127.0.0.1")
    devhub.add_argument("--port", type=int, default=8555)
    devhub.set_defaults(handler=_devhub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and (args.command != "merge" or any(e.startswith("-") for e in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.paths += extra
    log.configure(args.log_level)
    try:
        return args.handler(args)
    except MergebotError as error:
        print(f"mergebot: error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("mergebot: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
