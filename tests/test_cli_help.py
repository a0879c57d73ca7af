"""The command line as a user meets it: every `--help` speaks to users (no internals, every option explained),
`--version` answers, and the advice `status` gives is a command that runs as written."""

import argparse
import contextlib
import io
import json
import shlex

import pytest

from mergebot.cli import main
from mergebot.cli_parser import CHILD_COMMAND, build_parser
from mergebot.config.daemon import load_daemon_config
from mergebot.daemon.status import collect_status, format_status
from mergebot.errors import ExitCode
from tests.helpers import run_cli_process


def _subcommands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command path the public parser knows, the top level included."""
    found = [prefix]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                found += _subcommands(child, (*prefix, name))
    return found


def _help(argv: list[str]) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exited:
        main([*argv, "--help"])
    assert exited.value.code == 0
    return out.getvalue()


COMMANDS = _subcommands(build_parser())


def test_every_command_is_walked():
    names = {path[0] for path in COMMANDS if path}
    assert {"merge", "validate", "publish", "run", "status", "release", "demo", "devhub"} <= names
    assert CHILD_COMMAND not in names
    assert ("devhub", "push") in COMMANDS and ("devhub", "make-model") in COMMANDS


@pytest.mark.parametrize("path", COMMANDS, ids=lambda path: " ".join(path) or "mergebot")
def test_help_shows_no_internals(path):
    text = _help(list(path))
    for internal in ("SUPPRESS", CHILD_COMMAND, "--result", "--last-run", "Errors are caught", "==", "argparse"):
        assert internal not in text, (path, internal)
    assert text.startswith("usage: ")


@pytest.mark.parametrize("path", COMMANDS, ids=lambda path: " ".join(path) or "mergebot")
def test_every_option_has_help(path):
    parser = build_parser()
    for name in path:
        parser = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[name]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            assert all(choice.help for choice in action._choices_actions), path
            continue
        assert action.help and action.help != argparse.SUPPRESS, (path, action.dest)


def test_top_help_opens_for_users_and_version_answers(capsys):
    text = _help([])
    assert text.split("\n\n")[1].startswith("Keep merged open LLMs up to date")
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.startswith("mergebot 0.")


def test_merge_usage_reads_as_its_two_forms():
    usage = _help(["merge"]).split("\n\n")[0]
    assert "mergebot merge [options] CONFIG OUT_DIR" in usage
    assert "mergebot merge --method METHOD [options] MODEL[:WEIGHT]... OUT_DIR" in usage


def test_internal_child_command_still_parses():
    """The daemon's child is started as `mergebot run-target ...` (mergebot/daemon/children.py)."""
    with pytest.raises(SystemExit) as exited:
        main([CHILD_COMMAND, "--help"])
    assert exited.value.code == 0
    with pytest.raises(SystemExit) as refused:
        main(["frobnicate"])
    assert refused.value.code == 2


def _config(tmp_path):
    path = tmp_path / "my config.toml"
    path.write_text(
        f'[daemon]\nstate_dir = "{tmp_path / "state"}"\n\n[[targets]]\nname = "t"\nrepo = "me/t"\n'
        'merge_method = "linear"\nparameters = { weight = 1 }\nmodels = [{ model = "org/a" }, { model = "org/b" }]\n'
    )
    return path


def test_status_without_daemon_says_so(tmp_path):
    text = format_status(collect_status(load_daemon_config(_config(tmp_path))))
    assert "the daemon is not running" in text
    assert "  next " not in text, "no next check is shown while nothing checks"
    advice = text.split("`")[1]
    args = build_parser().parse_args(shlex.split(advice)[1:])
    assert (args.command, args.config) == ("run", str(tmp_path / "my config.toml"))


def test_release_advice_runs_as_written(tmp_path):
    status = collect_status(load_daemon_config(_config(tmp_path)))
    status["daemon_pid"] = 1
    status["targets"]["t"] |= {"hold": {"culprit": "org/b", "reason": "worse", "at": "a" * 40, "released": False}}
    text = format_status(status)
    advice = next(line for line in text.splitlines() if "held" in line).split("`")[1]
    args = build_parser().parse_args(shlex.split(advice)[1:])
    assert (args.command, args.target, args.config) == ("release", "t", str(tmp_path / "my config.toml"))


def test_the_daemons_child_reports_its_error_as_a_tagged_json_line(tmp_path):
    """What lands in the daemon's log: JSON lines only, the error too, tagged with the target."""
    config = _config(tmp_path)
    result = run_cli_process(
        CHILD_COMMAND, "--config", config, "--target", "nope", "--result", tmp_path / "result.json",
        input=config.read_text(),
    )  # fmt: skip
    assert result.returncode == ExitCode.PERMANENT
    (line,) = result.stderr.splitlines()
    event = json.loads(line)
    assert (event["event"], event["target"], event["level"]) == ("run failed", "nope", "error")
    assert event["error"] == f"{config}: no target named 'nope'"
    assert json.loads((tmp_path / "result.json").read_text())["reason"] == event["error"]
