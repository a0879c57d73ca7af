"""What each `mergebot` command does (its options: mergebot/cli_parser.py). Errors are caught here, reported once
as one line, and become the exit code."""

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from mergebot import log
from mergebot.cli_parser import CHILD_COMMAND, build_child_parser, build_parser
from mergebot.config.daemon import ValidateSettings
from mergebot.config.document import read_document
from mergebot.config.merge import MergeConfig, load_merge_config, parse_merge
from mergebot.config.moe import MoeConfig, is_moe_document, load_moe_config, parse_moe
from mergebot.config.quick import quick_config, weighted
from mergebot.errors import UNHEALTHY, ConfigError, ConfigErrors, ExitCode, MergebotError

if TYPE_CHECKING:
    from mergebot.pipeline.parents import SignatureCache
    from mergebot.pipeline.report import ValidationReport


def _merge(args: argparse.Namespace) -> int:
    from mergebot.config.stages import load_stages

    if args.method:
        *sources, out = args.paths
        if not sources or _is_model(out):
            raise ConfigError(f"merge --method: {out} is a model, not an output directory: give OUT_DIR last")
        options = {key: getattr(args, key) for key in ("base_model", "dtype", "tokenizer_source", "out_shard_size")}
        _merge_one(quick_config(args.method, sources, args.set or [], options), Path(out))
        return ExitCode.OK
    if len(args.paths) != 2:
        raise ConfigError("merge: give CONFIG OUT_DIR (or --method with model[:weight] sources)")
    config_path, out_dir = Path(args.paths[0]), Path(args.paths[1])
    stages = None if args.target else load_stages(config_path, out_dir)
    for stage in stages or ():
        with log.bound(stage=stage.name or "final"):
            _merge_one(stage.merge, stage.out_dir)
    if stages is None:
        _merge_one(_load_merge_or_moe(config_path, args.target), out_dir)
    return ExitCode.OK


def _load_merge_or_moe(path: Path, target: str | None = None) -> MergeConfig | MoeConfig:
    """A mergekit-moe config (a file listing `experts`), or a merge."""
    if target is None and is_moe_document(read_document(path)[0]):
        return load_moe_config(path)
    return load_merge_config(path, target)


def _is_model(argument: str) -> bool:
    """Whether the last argument of the quick form names a model rather than OUT_DIR: it has a weight, or it is a
    checkpoint directory that no merge wrote."""
    from mergebot.merge.engine import MERGE_CONFIG_FILE

    if weighted(argument)[1] is not None:
        return True
    path = Path(argument)
    return (path / "config.json").is_file() and not (path / MERGE_CONFIG_FILE).is_file()


def _merge_one(config: MergeConfig | MoeConfig, out_dir: Path) -> None:
    from mergebot.merge.engine import run_merge
    from mergebot.pipeline.inputs import resolve_inputs
    from mergebot.progress import ShardProgress

    for warning in config.warnings:
        print(f"mergebot: warning: {warning}", file=sys.stderr)
    started = time.monotonic()
    if isinstance(config, MoeConfig):
        from mergebot.merge.moe import run_moe
        from mergebot.pipeline.moe_hidden import ALL_ROUTERS

        result = run_moe(config, resolve_inputs(config), out_dir, ShardProgress(), ALL_ROUTERS)
    else:
        result = run_merge(config, resolve_inputs(config), out_dir, ShardProgress())
    log.get("merge").info(
        "merged",
        out_dir=str(result.out_dir),
        shards=len(result.shards),
        computed=len(result.computed),
        reused=len(result.reused),
        seconds=round(time.monotonic() - started, 1),
    )


def _merged_config(out_dir: Path) -> MergeConfig | MoeConfig:
    """The merge an output was made from (its mergebot_config.yml, pinned to the revisions merged)."""
    from mergebot.merge.engine import MERGE_CONFIG_FILE

    path = out_dir / MERGE_CONFIG_FILE
    if not path.exists():
        raise ConfigError(f"{out_dir}: no {MERGE_CONFIG_FILE}; was it made by `mergebot merge`?")
    document, located = read_document(path)
    return parse_moe(document, located) if is_moe_document(document) else parse_merge(document, located)


def _signature_cache() -> "SignatureCache":
    """Parents' signatures, remembered per revision in mergebot's cache directory (CLI and daemon alike)."""
    from mergebot.files import default_cache_dir
    from mergebot.pipeline.parents import SignatureCache

    return SignatureCache(default_cache_dir() / "signatures")


def _gate(args: argparse.Namespace, merged: MergeConfig) -> "ValidationReport":
    """The gate on OUT_DIR with the models it was made from as parents."""
    from mergebot.pipeline.inputs import resolve_inputs
    from mergebot.pipeline.run import check_merge

    settings = ValidateSettings(eval_text=Path(args.eval_text), max_ppl_ratio=args.max_ppl_ratio, max_kl=args.max_kl)
    return check_merge(Path(args.out_dir), resolve_inputs(merged), settings, _signature_cache())


def _validate(args: argparse.Namespace) -> int:
    from mergebot.pipeline.report import format_report

    started = time.monotonic()
    report = _gate(args, _merged_config(Path(args.out_dir)))
    print(format_report(report))
    log.get("validate").info(
        "validated",
        out_dir=args.out_dir,
        passed=report.passed,
        merge_ppl=report.merge_ppl,
        seconds=round(time.monotonic() - started, 1),
    )
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


def _child(args: argparse.Namespace) -> int:
    """`_child_run`, whose every line (its error line included) lands in the daemon's log tagged with its target
    and run."""
    log.tag(target=args.target, run=args.run_id)
    try:
        return _child_run(args)
    except MergebotError as error:
        log.get("run").error("run failed", error=str(error), exit_code=int(error.exit_code))
        return error.exit_code


def _daemon(args: argparse.Namespace) -> int:
    from mergebot.daemon.scheduler import Daemon

    daemon = Daemon(Path(args.config))
    return daemon.run_once() if args.command == "once" else daemon.run()


def _check_config(args: argparse.Namespace) -> int:
    """A daemon config, or a merge file (mergekit YAML, one or several stages, or a TOML merge): everything a run
    checks before it reads a tensor, every problem at once, and each warning."""
    from mergebot.config.daemon import check_daemon_config

    path = Path(args.config)
    if _is_merge_file(path):
        return _check_merge_file(path)
    config, problems = check_daemon_config(path)
    for warning in config.warnings if config is not None else ():
        print(f"mergebot: warning: {warning}", file=sys.stderr)
    for problem in problems:
        print(f"mergebot: error: {problem}", file=sys.stderr)
    if problems:
        return ExitCode.PERMANENT
    assert config is not None
    print(f"{args.config}: ok, {len(config.targets)} target(s): {', '.join(sorted(config.targets)) or 'none'}")
    return ExitCode.OK


def _is_merge_file(path: Path) -> bool:
    """A mergekit YAML file, or a TOML file with the merge at its top level (no [daemon], no [[targets]])."""
    if path.suffix.lower() in (".yml", ".yaml"):
        return True
    try:
        document, _ = read_document(path)
    except ConfigError:
        return False  # check_daemon_config reports it
    return not {"daemon", "targets"} & set(document)


def _check_merge_file(path: Path) -> int:
    from mergebot.config.stages import load_stages

    stages = load_stages(path, Path("OUT_DIR"))
    merges = [stage.merge for stage in stages] if stages else [_load_merge_or_moe(path)]
    for merge in merges:
        for warning in merge.warnings:
            print(f"mergebot: warning: {warning}", file=sys.stderr)
    print(f"{path}: ok, {len(merges)} merge(s)")
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
    from mergebot.dev.devhub.tools import make_model, push_folder

    if args.devhub_command == "push":
        commit = push_folder(Path(args.model_dir), args.repo, args.endpoint)
        print(f"pushed {args.model_dir} to {args.repo} at {args.endpoint}: commit {commit}")
    elif args.devhub_command == "make-model":
        make_model(args)
        print(f"wrote a {args.layers}-layer model to {args.out_dir}")
    elif args.root is None:
        raise ConfigError("devhub: give --root DIR (the directory that holds the repos) to serve a local Hub")
    else:
        serve(Path(args.root), args.host, args.port)
    return ExitCode.OK


HANDLERS = {
    "merge": _merge,
    "validate": _validate,
    "publish": _publish,
    "run": _daemon,
    "once": _daemon,
    "check-config": _check_config,
    "cache-clean": _cache_clean,
    "status": _status,
    "release": _release,
    "demo": _demo,
    "devhub": _devhub,
    CHILD_COMMAND: _child,
}


def _parse(argv: list[str]) -> argparse.Namespace:
    """The daemon's child has a parser of its own; `merge` takes sources after options too (`--set k=v A B OUT`)."""
    if argv[:1] == [CHILD_COMMAND]:
        return build_child_parser().parse_args(argv[1:])
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and (args.command != "merge" or any(e.startswith("-") for e in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.paths += extra
    return args


def main(argv: list[str] | None = None) -> int:
    if not sys.stderr.isatty():
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    args = _parse(sys.argv[1:] if argv is None else argv)
    log.configure(args.log_level)
    try:
        return HANDLERS[args.command](args)
    except MergebotError as error:
        for warning in error.warnings if isinstance(error, ConfigErrors) else ():
            print(f"mergebot: warning: {warning}", file=sys.stderr)
        for line in str(error).splitlines() if isinstance(error, ConfigErrors) else [str(error)]:
            print(f"mergebot: error: {log.redact(line)}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("mergebot: interrupted", file=sys.stderr)
        return ExitCode.INTERRUPTED
    except Exception as error:  # a bug: its traceback, once, and an exit code no refusal uses
        log.get("cli").exception("internal error", error=f"{type(error).__name__}: {error}")
        return ExitCode.INTERNAL_ERROR


if __name__ == "__main__":
    sys.exit(main())
