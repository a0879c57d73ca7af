"""The `mergebot` command line as a user reads it in `--help`; what each command does lives in mergebot/cli.py.

The daemon's child command (`run-target`) has a parser of its own, so no help, usage or error of the public
parser names it.
"""

import argparse
import os
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from mergebot.config.daemon import ValidateSettings

DESCRIPTION = (
    "Keep merged open LLMs up to date: merge Hugging Face Hub models shard by shard, check the merge, publish it, "
    "and (as a daemon) do it again whenever an upstream model changes."
)
EPILOG = (
    "New here? `mergebot demo` shows the whole job offline in under two minutes. `mergebot COMMAND --help` for more."
)
MERGE_USAGE = """
  mergebot merge [options] CONFIG OUT_DIR
  mergebot merge --method METHOD [options] MODEL[:WEIGHT]... OUT_DIR"""
CHILD_COMMAND = "run-target"


def _version() -> str:
    try:
        return version("mergebot")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def _config_option(command: argparse.ArgumentParser) -> None:
    command.add_argument("--config", required=True, metavar="FILE", help="the daemon's TOML config file")


def _merge_parser(commands: argparse._SubParsersAction) -> None:
    merge = commands.add_parser(
        "merge",
        help="merge models shard by shard into OUT_DIR (resumable)",
        description="Merge models into OUT_DIR, shard by shard; run it again to resume. Give a config (mergekit "
        "YAML or mergebot TOML) or, with --method, the models on the command line.",
        usage=MERGE_USAGE,
    )
    merge.add_argument(
        "paths", nargs="+", metavar="PATH", help="CONFIG OUT_DIR, or with --method: MODEL[:WEIGHT]... OUT_DIR"
    )
    merge.add_argument("--target", help="which [[targets]] entry of a TOML config to merge")
    merge.add_argument("--method", help="merge without a config file with this method, e.g. linear, slerp, ties")
    merge.add_argument("--set", action="append", metavar="KEY=VALUE", help="a method parameter (with --method)")
    merge.add_argument("--base-model", dest="base_model", metavar="MODEL", help="the base model (with --method)")
    merge.add_argument("--dtype", help="the output's dtype, e.g. bfloat16 (with --method)")
    merge.add_argument(
        "--tokenizer-source", dest="tokenizer_source", metavar="SOURCE", help="whose tokenizer to use (with --method)"
    )
    merge.add_argument(
        "--out-shard-size", dest="out_shard_size", metavar="SIZE", help="largest output shard, e.g. 2GB (with --method)"
    )


def _gate_parsers(commands: argparse._SubParsersAction) -> None:
    defaults = ValidateSettings()
    for name, help_text in (
        ("validate", "quick load + perplexity gate on a merged directory (exit 0 pass, 1 fail)"),
        ("publish", "validate, then upload a merged directory as one commit with a model card"),
    ):
        command = commands.add_parser(name, help=help_text, description=help_text[0].upper() + help_text[1:] + ".")
        command.add_argument("out_dir", metavar="OUT_DIR", help="a directory made by `mergebot merge`")
        command.add_argument("--eval-text", default=str(defaults.eval_text), help="text for the perplexity check")
        command.add_argument(
            "--max-ppl-ratio",
            type=float,
            default=defaults.max_ppl_ratio,
            help="largest perplexity allowed, as a multiple of the worst healthy parent's (default %(default)s)",
        )
        command.add_argument(
            "--max-kl",
            type=float,
            default=defaults.max_kl,
            help="largest KL divergence from the nearest parent, nats/token (default %(default)s)",
        )
        if name == "publish":
            command.add_argument("--repo", required=True, metavar="ORG/NAME", help="the Hub repo to publish to")
            command.add_argument("--private", action="store_true", help="create the repo private if missing")
            command.add_argument("--force", action="store_true", help="publish even if validation failed")


def _daemon_parsers(commands: argparse._SubParsersAction) -> None:
    for name, help_text in (
        ("run", "run the daemon in the foreground"),
        ("once", "run every due target once and exit (for cron)"),
        ("check-config", "check a config file offline"),
        ("cache-clean", "remove cached upstream revisions no target needs"),
    ):
        _config_option(
            commands.add_parser(name, help=help_text, description=help_text[0].upper() + help_text[1:] + ".")
        )

    status = commands.add_parser("status", help="each target's inputs, last run and why it waits")
    _config_option(status)
    status.add_argument("--json", action="store_true", help="print the status as JSON")
    status.add_argument("--health", action="store_true", help="exit 0 when a daemon runs on this state, else 4")

    release = commands.add_parser("release", help="let a held target publish its inputs if they pass the gate")
    release.add_argument("target", metavar="TARGET", help="the held target's name")
    _config_option(release)


def _dev_parsers(commands: argparse._SubParsersAction) -> None:
    demo = commands.add_parser(
        "demo", help="the whole job with a real model on an embedded local Hub, offline, in under two minutes"
    )
    demo.add_argument("--keep", action="store_true", help="keep the demo directory to explore")

    devhub = commands.add_parser(
        "devhub",
        help="your own local Hub: serve it, push a model to it, make small test models",
        description="Without a subcommand: serve the local Hub in the foreground (--root is then required).",
    )
    devhub.add_argument("--root", metavar="DIR", help="directory that holds the repos")
    devhub.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s)")
    devhub.add_argument("--port", type=int, default=8555, help="port to listen on (default %(default)s)")
    tools = devhub.add_subparsers(title="subcommands", dest="devhub_command", metavar="SUBCOMMAND")
    push = tools.add_parser("push", help="upload a model directory to a Hub repo as one commit")
    push.add_argument("model_dir", metavar="DIR", help="the model directory to upload")
    push.add_argument("repo", metavar="ORG/NAME", help="the repo, created if missing")
    push.add_argument(
        "--endpoint",
        default=os.environ.get("HF_ENDPOINT", "http://127.0.0.1:8555"),
        help="the Hub's URL (default: HF_ENDPOINT, else the local Hub's default, %(default)s)",
    )
    make = tools.add_parser("make-model", help="write a small random Llama-shaped model (for tests and trials)")
    make.add_argument("out_dir", metavar="OUT_DIR", help="a directory that does not exist yet or is empty")
    make.add_argument("--layers", type=int, default=4, help="decoder layers (default %(default)s)")
    make.add_argument("--hidden", type=int, default=64, help="hidden size (default %(default)s)")
    make.add_argument("--heads", type=int, default=4, help="attention heads (default %(default)s)")
    make.add_argument("--kv-heads", type=int, default=2, help="key/value heads (default %(default)s)")
    make.add_argument("--intermediate", type=int, default=128, help="MLP width (default %(default)s)")
    make.add_argument("--vocab", type=int, default=512, help="vocabulary size (default %(default)s)")
    make.add_argument("--seed", type=int, default=0, help="same seed, same bytes (default %(default)s)")
    make.add_argument(
        "--fine-tune-of", metavar="DIR", help="make a 'fine-tune': this model's weights plus seeded noise"
    )


def build_parser() -> argparse.ArgumentParser:
    """The public command line: every command and option a user may type, each with its help."""
    parser = argparse.ArgumentParser(prog="mergebot", description=DESCRIPTION, epilog=EPILOG)
    parser.add_argument("--version", action="version", version=f"mergebot {_version()}")
    parser.add_argument(
        "--log-level",
        default=os.environ.get("MERGEBOT_LOG_LEVEL", "info"),
        choices=["debug", "info", "warning", "error"],
        help="how much to log (default info; also MERGEBOT_LOG_LEVEL)",
    )
    commands = parser.add_subparsers(title="commands", dest="command", required=True, metavar="COMMAND")
    _merge_parser(commands)
    _gate_parsers(commands)
    _daemon_parsers(commands)
    _dev_parsers(commands)
    return parser


def build_child_parser() -> argparse.ArgumentParser:
    """`mergebot run-target`: the daemon starts it, one target's run (not for people, so not in `--help`)."""
    parser = argparse.ArgumentParser(prog=f"mergebot {CHILD_COMMAND}")
    parser.add_argument("--log-level", default=os.environ.get("MERGEBOT_LOG_LEVEL", "info"))
    parser.add_argument("--config", required=True)
    parser.add_argument("--target", required=True)
    parser.add_argument("--result", required=True, type=Path)
    parser.add_argument("--last-run", type=Path, help="the last successful run's record, when the state is elsewhere")
    parser.add_argument("--inputs", type=Path, help="JSON: model -> the revision the daemon resolved, merged as is")
    parser.add_argument("--run-id", type=int, help="the daemon's run id, named in the commit it publishes")
    parser.set_defaults(command=CHILD_COMMAND)
    return parser
