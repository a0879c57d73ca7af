"""README.md stays true: every config key is documented, every documented key exists, every command parses."""

import re
import shlex
from pathlib import Path

import pytest

from mergebot.cli import build_parser
from mergebot.config.daemon import DAEMON_KEYS, NOTIFY_KEYS, TARGET_KEYS
from mergebot.config.executor import RAY_KEYS
from mergebot.config.merge import MERGE_KEYS
from mergebot.merge.methods import BUILTIN_METHODS

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
CI = (Path(__file__).resolve().parents[1] / ".ci" / "run").read_text()


def table_keys(heading: str) -> set[str]:
    """First-column `keys` of the table that follows a heading line such as "`[daemon]`"."""
    section = README.split(heading, 1)[1].split("\n\n", 2)[1]
    return {match for match in re.findall(r"^\| `([a-z_]+)` \|", section, flags=re.MULTILINE)}


def test_daemon_keys_documented():
    assert table_keys("`[daemon]`") == DAEMON_KEYS


def test_target_keys_documented():
    assert table_keys("`[[targets]]`") == TARGET_KEYS | MERGE_KEYS


def test_notify_keys_documented():
    assert table_keys("`[[notify]]`") == NOTIFY_KEYS


def test_ray_keys_documented():
    assert table_keys("`[daemon.ray]`") == RAY_KEYS


def test_methods_documented_with_their_parameters():
    rows = {m: line for line in README.splitlines() if (m := (re.match(r"^\| `(\w+)` \|", line) or [None, None])[1])}
    for name, method in BUILTIN_METHODS.items():
        assert name in rows, name
        for parameter in (*method.parameters, *method.model_parameters):
            if parameter != "int8_mask":
                assert f"`{parameter}`" in rows[name], (name, parameter)


def commands() -> list[list[str]]:
    """Every `mergebot ...` command line in README code blocks."""
    found = []
    for block in re.findall(r"```bash\n(.*?)```", README, flags=re.DOTALL):
        for line in block.splitlines():
            line = line.split("#", 1)[0].strip()
            words = shlex.split(line) if line else []
            for index, word in enumerate(words):
                if word.endswith("mergebot") and index + 1 < len(words):
                    found.append(words[index + 1 :])
    return found


@pytest.mark.parametrize("argv", commands(), ids=lambda argv: " ".join(argv))
def test_readme_commands_parse(argv):
    _, extra = build_parser().parse_known_args(argv)
    assert all(not word.startswith("-") for word in extra), extra


def test_quick_start_is_what_ci_runs():
    """The lean install and the demo, then the test extra and the tests: CI runs each line as written, in order."""
    section = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    lines = [
        line for block in re.findall(r"```bash\n(.*?)```", section, flags=re.DOTALL) for line in block.splitlines()
    ]
    assert len(lines) == 4
    assert "'.[demo]'" in lines[0] and "test" not in lines[0], "a user's install is the demo's needs only"
    assert lines[1].endswith("mergebot demo") and "'.[test]'" in lines[2] and "pytest" in lines[3]
    positions = [CI.index(line) for line in lines]
    assert positions == sorted(positions)
