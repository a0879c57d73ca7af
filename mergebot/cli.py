"""The `mergebot` command. Errors are caught here, reported once as one line, and become the exit code."""

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from mergebot import log
from mergebot.config.daemon import ValidateSettings
from mergebot.config.document import Located, read_document
from mergebot.config.merge import MergeConfig, load_merge_config, parse_merge
from mergebot.errors import UNHEALTHY, ConfigError, ExitCode, MergebotError

if TYPE_CHECKING:
    from mergebot.pipeline.parents import SignatureCache
    from mergebot.pipeline.report import ValidationReport


def _quick_config(args: argparse.Namespace, weighted: list[str]) -> MergeConfig:
    """`--method linear A:0.6 B:0.4 OUT`: models as model[:weight], other parameters as --set key=value."""
    models = []
    for argument in weighted:
        model, sep, weight = argument.rpartition(":")
        if sep and not Path(argument).exists():
            try:
                models.append({"model": model, "parameters": {"weight": float(weight)}})
                continue
            except ValueError:
                pass
        models.append({"model": argument})
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
    from mergebot.config.stages import load_stages

    if args.method:
        if len(args.paths) < 2:
            raise ConfigError("merge --method: give model[:weight] sources and then OUT_DIR")
        _merge_one(_quick_config(args, args.paths[:-1]), Path(args.paths[-1]))
        return ExitCode.OK
    if len(args.paths) != 2:
        raise ConfigError("merge: give CONFIG OUT_DIR (or --method with model[:weight] sources)")
    config_path, out_dir = Path(args.paths[0]), Path(args.paths[1])
    stages = None if args.target else load_stages(config_path, out_dir)
    for stage in stages or ():
        with log.bound(stage=stage.name or "final"):
            _merge_one(stage.merge, stage.out_dir)
    if stages is None:
        _merge_one(load_merge_config(config_path, args.target), out_dir)
    return ExitCode.OK


def _merge_one(config: MergeConfig, out_dir: Path) -> None:
    from mergebot.merge.engine import run_merge
    from mergebot.pipeline.inputs import resolve_inputs
    from mergebot.progress import ShardProgress

    result = run_merge(config, resolve_inputs(config), out_dir, ShardProgress())
    log.get("merge").info(
        "merged",
        out_dir=str(result.out_dir),
        shards=len(result.shards),
        computed=len(result.computed),
        reused=len(result.reused),
    )


def _merged_config(out_dir: Path) -> MergeConfig:
    """The merge an output was made from (its mergebot_config.yml, pinned to the revisions merged)."""
    from mergebot.merge.engine import MERGE_CONFIG_FILE

    path = out_dir / MERGE_CONFIG_FILE
    if not path.exists():
        raise ConfigError(f"{out_dir}: no {MERGE_CONFIG_FILE}; was it made by `mergebot merge`?")
    document, located = read_document(path)
    return parse_merge(document, located)


def _signature_cache() -> "SignatureCache":
    """Parents' signatures, remembered per revision in mergebot's cache directory (CLI and daemon alike)."""
    from mergebot.files import default_cache_dir
    from mergebot.pipeline.parents import SignatureCache

    return SignatureCache(default_cache_dir() / "signatures")


def _gate(args: argparse.Namespace, merged: MergeConfig) -> "ValidationReport":
    """The gate on OUT_DIR with the models it was made from as parents."""
    from mergebot.config.daemon import ValidateSettings
    from mergebot.pipeline.inputs import resolve_inputs
    from mergebot.pipeline.run import check_merge

    settings = ValidateSettings(eval_text=Path(args.eval_text), max_ppl_ratio=args.max_ppl_ratio, max_kl=args.max_kl)
    return check_merge(Path(args.out_dir), resolve_inputs(merged), settings, _signature_cache())


def _validate(args: argparse.Namespace) -> int:
    from mergebot.pipeline.report import format_report

    report = _gate(args, _merged_config(Path(args.out_dir)))
    print(format_report(report))
    return ExitCode.OK if report.passed else ExitCode.VALIDATION_FAILED


def _publish(args: argparse.Namespace) -> int:
    from mergebot.hub.client import HubClient
    from mergebot.pipeline.publish import publish
    from mergebot.pipeline.report import format_report

    out_dir = Path(args.out_dir)
    merged = _merged_config(out_dir)
    report = _gate(args, merged)
    print(format_report(report))
    result = publish(out_dir, args.repo, HubClient(), report, merged, private=args.private, force=args.force)
    log.get("publish").info(
        "published", repo=result.repo, sha=result.commit, uploaded=result.uploaded, unchanged=len(result.unchanged)
    )
    return ExitCode.OK


def _child_run(args: argparse.Namespace) -> int:
    """The daemon's child: one target's pipeline, from the config text the daemon runs (on stdin) and the inputs
    it pinned; the run record goes to --result. An unexpected exception is an internal error, not a refusal."""
    from mergebot.config.daemon import load_daemon_config
    from mergebot.daemon.children import die_with_daemon
    from mergebot.daemon.runs import run_from_dict
    from mergebot.daemon.state import State
    from mergebot.files import write_atomic
    from mergebot.pause import pause_point
    from mergebot.pipeline.inputs import read_pinned
    from mergebot.pipeline.regression import baseline_from_record
    from mergebot.pipeline.run import run_pipeline
    from mergebot.runrecord import Outcome, RunRecord, to_json

    die_with_daemon()
    try:
        pause_point("start")
        pinned = read_pinned(args.inputs) if args.inputs is not None else None
        config = load_daemon_config(Path(args.config), sys.stdin.read())
        if args.target not in config.targets:
            raise ConfigError(f"{args.config}: no target named {args.target!r}")
        if args.last_run is not None:  # on a Ray worker: the daemon read the state, which is on its machine
            record = json.loads(args.last_run.read_text())
            last = run_from_dict(record) if record else None
        else:
            # Beside the running daemon: WAL lets it read meanwhile, and the busy timeout waits out its short writes.
            with State.open(config.daemon.state_dir) as state:
                # `mergebot release`: this run is not compared with the last publish
                last = None if args.target in state.releases() else state.last_successful_run(args.target)
        target = config.targets[args.target]
        baseline = None
        if last is not None:
            same_merge = last.config_hash == target.config_hash
            baseline = baseline_from_record(last.published_sha, last.inputs, last.record, same_merge=same_merge)
        run = run_pipeline(config, target, _signature_cache(), baseline, pinned, args.run_id)
    except MergebotError as error:
        write_atomic(args.result, to_json(RunRecord(reason=str(error))).encode())
        raise
    except Exception as error:
        reason = f"internal error: {type(error).__name__}: {error}".splitlines()[0]
        write_atomic(args.result, to_json(RunRecord(Outcome.INTERNAL_ERROR, reason)).encode())
        raise
    write_atomic(args.result, to_json(run).encode())
    return {Outcome.FAILED: ExitCode.VALIDATION_FAILED, Outcome.HELD: ExitCode.HELD}.get(run.outcome, ExitCode.OK)


def _daemon(args: argparse.Namespace) -> int:
    from mergebot.daemon.scheduler import Daemon

    daemon = Daemon(Path(args.config))
    return daemon.run_once() if args.command == "once" else daemon.run()


def _check_config(args: argparse.Namespace) -> int:
    from mergebot.config.daemon import check_daemon_config

    config, problems = check_daemon_config(Path(args.config))
    for problem in problems:
        print(f"mergebot: error: {problem}", file=sys.stderr)
    if problems:
        return ExitCode.PERMANENT
    assert config is not None
    print(f"{args.config}: ok, {len(config.targets)} target(s): {', '.join(sorted(config.targets)) or 'none'}")
    return ExitCode.OK


def _status(args: argparse.Namespace) -> int:
    from mergebot.config.daemon import load_daemon_config
    from mergebot.daemon.lock import daemon_pid
    from mergebot.daemon.status import collect_status, format_status

    config = load_daemon_config(Path(args.config))
    if args.health:
        pid = daemon_pid(config.daemon.state_dir)
        collect_status(config)
        print(f"healthy: daemon pid {pid}" if pid else "unhealthy: no mergebot daemon holds the state lock")
        return ExitCode.OK if pid else UNHEALTHY
    status = collect_status(config)
    print(json.dumps(status, indent=2, sort_keys=True) if args.json else format_status(status))
    return ExitCode.OK


def _cache_clean(args: argparse.Namespace) -> int:
    from mergebot.config.daemon import load_daemon_config
    from mergebot.daemon.cleanup import clean_unused_revisions
    from mergebot.daemon.state import State

    config = load_daemon_config(Path(args.config))
    with State.open(config.daemon.state_dir) as state:
        removed, freed = clean_unused_revisions(config, state)
    print(f"removed {removed} cached revision(s), freed {freed / 1e6:.1f} MB")
    return ExitCode.OK


def _release(args: argparse.Namespace) -> int:
    """A person's release of a held target: its next run skips the comparison with the last publish (the gate
    still applies). A short write beside the running daemon, which notices it within seconds."""
    from mergebot.config.daemon import load_daemon_config
    from mergebot.daemon.lock import daemon_pid
    from mergebot.daemon.state import STATE_FILE, State

    config = load_daemon_config(Path(args.config))
    if args.target not in config.targets:
        raise ConfigError(f"{args.config}: no target named {args.target!r}")
    held = None
    if (config.daemon.state_dir / STATE_FILE).is_file():
        with State.open(config.daemon.state_dir) as state:
            held = state.request_release(args.target)
    if held is None:
        raise MergebotError(f"{args.target} is not held: only a target whose last run was held can be released")
    runner = "the daemon" if daemon_pid(config.daemon.state_dir) else "the next `mergebot run` or `mergebot once`"
    print(
        f"{args.target}: released; {runner} runs it without comparing it to the last publish (the gate still applies)"
    )
    return ExitCode.OK


def _demo(args: argparse.Namespace) -> int:
    from mergebot.dev.demo import run_demo

    return run_demo(keep=args.keep)


def _devhub(args: argparse.Namespace) -> int:
    from mergebot.dev.devhub import serve

    serve(Path(args.root), args.host, args.port)
    return ExitCode.OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mergebot", description=__doc__)
    parser.add_argument(
        "--log-level",
        default=os.environ.get("MERGEBOT_LOG_LEVEL", "info"),
        choices=["debug", "info", "warning", "error"],
        help="also MERGEBOT_LOG_LEVEL",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    merge = commands.add_parser("merge", help="merge models shard by shard into OUT_DIR (resumable)")
    merge.add_argument("paths", nargs="+", metavar="CONFIG OUT_DIR | MODEL[:WEIGHT]... OUT_DIR")
    merge.add_argument("--target", help="which [[targets]] entry of a TOML config to merge")
    merge.add_argument("--method", help="quick form without a config file, e.g. linear")
    merge.add_argument("--set", action="append", metavar="KEY=VALUE", help="a method parameter (quick form)")
    merge.add_argument("--base-model", dest="base_model")
    merge.add_argument("--dtype")
    merge.add_argument("--tokenizer-source", dest="tokenizer_source")
    merge.add_argument("--out-shard-size", dest="out_shard_size")
    merge.set_defaults(handler=_merge)

    defaults = ValidateSettings()
    for name, handler, help_text in (
        ("validate", _validate, "quick load + perplexity gate on a merged directory (exit 0 pass, 1 fail)"),
        ("publish", _publish, "validate, then upload a merged directory as one commit with a model card"),
    ):
        command = commands.add_parser(name, help=help_text)
        command.add_argument("out_dir", metavar="OUT_DIR")
        command.add_argument("--eval-text", default=str(defaults.eval_text), help="text for the perplexity check")
        command.add_argument(
            "--max-ppl-ratio", type=float, default=defaults.max_ppl_ratio, help="limit vs the worst healthy parent"
        )
        command.add_argument("--max-kl", type=float, default=defaults.max_kl, help="nats/token from the nearest parent")
        command.set_defaults(handler=handler)
        if name == "publish":
            command.add_argument("--repo", required=True, metavar="ORG/NAME")
            command.add_argument("--private", action="store_true", help="create the repo private if missing")
            command.add_argument("--force", action="store_true", help="publish even if validation failed")

    for name, handler, help_text in (
        ("run", _daemon, "run the daemon in the foreground"),
        ("once", _daemon, "run every due target once and exit (for cron)"),
        ("check-config", _check_config, "check a config file offline"),
        ("cache-clean", _cache_clean, "remove cached upstream revisions no target needs"),
    ):
        command = commands.add_parser(name, help=help_text)
        command.add_argument("--config", required=True, metavar="FILE")
        command.set_defaults(handler=handler)

    status = commands.add_parser("status", help="each target's inputs, last run and why it waits")
    status.add_argument("--config", required=True, metavar="FILE")
    status.add_argument("--json", action="store_true")
    status.add_argument("--health", action="store_true", help="exit 0 when a daemon runs on this state")
    status.set_defaults(handler=_status)

    release = commands.add_parser("release", help="let a held target publish its inputs if they pass the gate")
    release.add_argument("target", metavar="TARGET")
    release.add_argument("--config", required=True, metavar="FILE")
    release.set_defaults(handler=_release)

    child = commands.add_parser("run-target", help=argparse.SUPPRESS)
    child.add_argument("--config", required=True)
    child.add_argument("--target", required=True)
    child.add_argument("--result", required=True, type=Path)
    child.add_argument("--inputs", type=Path, help="JSON: model -> the revision the daemon resolved, merged as is")
    child.add_argument("--run-id", type=int, help="the daemon's run id, named in the commit it publishes")
    child.add_argument("--last-run", type=Path, help="the last successful run's record, when the state is elsewhere")
    child.set_defaults(handler=_child_run)

    demo = commands.add_parser(
        "demo", help="the whole job with a real model on an embedded local Hub, offline, in under two minutes"
    )
    demo.add_argument("--keep", action="store_true", help="keep the demo directory to explore")
    demo.set_defaults(handler=_demo)

    devhub = commands.add_parser("devhub", help="run the local Hub server in the foreground")
    devhub.add_argument("--root", required=True, help="directory that holds the repos")
    devhub.add_argument("--host", default="127.0.0.1")
    devhub.add_argument("--port", type=int, default=8555)
    devhub.set_defaults(handler=_devhub)
    return parser


def main(argv: list[str] | None = None) -> int:
    if not sys.stderr.isatty():
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
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
        return ExitCode.INTERRUPTED
    except Exception as error:  # a bug: its traceback, once, and an exit code no refusal uses
        log.get("cli").exception("internal error", error=f"{type(error).__name__}: {error}")
        return ExitCode.INTERNAL_ERROR


if __name__ == "__main__":
    sys.exit(main())
