"""The daemon's config file: `[daemon]` settings and `[[targets]]`, each target a merge plus where and when it is
published and how it is checked. Everything is checked offline, with the key and line of each problem.
"""

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from apscheduler.triggers.cron import CronTrigger

from mergebot.config.document import Located, listen_address, parse_duration, read_document
from mergebot.config.merge import MERGE_KEYS, MergeConfig, target_merge
from mergebot.errors import ConfigError

DAEMON_KEYS = {
    "state_dir",
    "poll_interval",
    "schedule",
    "hub_endpoint",
    "max_concurrent_merges",
    "merge_timeout",
    "stop_grace",
    "debounce",
    "retry_delay",
    "max_retries",
    "webhook",
    "metrics_listen",
}
TARGET_KEYS = {"name", "repo", "when", "private", "validate", "mergekit_config"} | MERGE_KEYS
DEFAULT_EVAL_TEXT = Path(__file__).parent.parent / "data" / "eval.txt"


@dataclass(frozen=True)
class ValidateSettings:
    eval_text: Path = DEFAULT_EVAL_TEXT
    max_ppl_ratio: float = 1.25


@dataclass(frozen=True)
class Target:
    """One merged model the daemon keeps up to date: where it is published, when it runs, how it is checked."""

    name: str
    repo: str
    merge: MergeConfig
    when: str = "on_change"
    private: bool = False
    validate: ValidateSettings = field(default_factory=ValidateSettings)
    config_hash: str = ""
    """Changes whenever anything that shapes the published result changes."""


@dataclass(frozen=True)
class DaemonSettings:
    state_dir: Path
    poll_interval: float = 900.0
    schedule: str = "0 3 * * *"
    hub_endpoint: str | None = None
    max_concurrent_merges: int = 1
    merge_timeout: float = 6 * 3600.0
    stop_grace: float = 30.0
    debounce: float = 60.0
    retry_delay: float = 300.0
    max_retries: int = 5
    webhook_listen: tuple[str, int] | None = None
    webhook_secret_env: str = "MERGEBOT_WEBHOOK_SECRET"
    metrics_listen: tuple[str, int] | None = None


@dataclass(frozen=True)
class DaemonConfig:
    path: Path
    daemon: DaemonSettings
    targets: dict[str, Target]


def load_daemon_config(path: Path, text: str | None = None) -> DaemonConfig:
    """The whole daemon config; the first problem found is raised with its key and line."""
    config, problems = check_daemon_config(path, text)
    if problems:
        raise problems[0]
    assert config is not None
    return config


def check_daemon_config(path: Path, text: str | None = None) -> tuple[DaemonConfig | None, list[ConfigError]]:
    """Everything that can be checked offline; every target is checked, so all problems are reported at once.

    `text`, when given, is the file's content as the daemon accepted it (relative paths still resolve beside
    `path`), so a merge child works from the running config even after a broken edit on disk."""
    try:
        document, located = read_document(path, text)
        daemon = _daemon_settings(document.get("daemon", {}), located)
    except ConfigError as error:
        return None, [error]
    problems: list[ConfigError] = []
    unknown = sorted(set(document) - {"daemon", "targets"})
    problems += [located.error(key, "unknown top-level key (known: daemon, targets)") for key in unknown]
    raw_targets = document.get("targets", [])
    if not isinstance(raw_targets, list):
        return None, [*problems, located.error("targets", "must be a list of [[targets]] tables")]
    targets: dict[str, Target] = {}
    for index, raw in enumerate(raw_targets):
        try:
            target = _target(raw, located, f"targets[{index}].")
            if target.name in targets:
                raise located.error(f"targets[{index}].name", f"{target.name!r} is used by two targets")
            targets[target.name] = target
        except ConfigError as error:
            problems.append(error)
    return DaemonConfig(path, daemon, targets), problems


def _daemon_settings(raw: Any, located: Located) -> DaemonSettings:
    if not isinstance(raw, dict):
        raise located.error("daemon", "must be a table")
    unknown = sorted(set(raw) - DAEMON_KEYS)
    if unknown:
        raise located.error(f"daemon.{unknown[0]}", f"unknown key (known: {', '.join(sorted(DAEMON_KEYS))})")
    state_dir = os.environ.get("MERGEBOT_STATE_DIR") or raw.get("state_dir")
    if not state_dir:
        raise located.error("daemon.state_dir", "required (or set MERGEBOT_STATE_DIR)")
    schedule = str(raw.get("schedule", "0 3 * * *"))
    try:
        CronTrigger.from_crontab(schedule)
    except ValueError as error:
        raise located.error("daemon.schedule", f"{schedule!r} is not a cron expression ({error})") from error
    durations = {
        key: parse_duration(raw[key], f"daemon.{key}", located)
        for key in ("poll_interval", "merge_timeout", "stop_grace", "debounce", "retry_delay")
        if key in raw
    }
    for key in ("max_concurrent_merges", "max_retries"):
        if key in raw and not (isinstance(raw[key], int) and raw[key] >= 1):
            raise located.error(f"daemon.{key}", "must be a whole number >= 1")
    webhook = raw.get("webhook")
    if webhook is not None and not isinstance(webhook, dict):
        raise located.error("daemon.webhook", "must be a table with listen and secret_env")
    return DaemonSettings(
        state_dir=(located.path.parent / Path(state_dir).expanduser()).resolve(),
        schedule=schedule,
        hub_endpoint=raw.get("hub_endpoint"),
        max_concurrent_merges=raw.get("max_concurrent_merges", 1),
        max_retries=raw.get("max_retries", 5),
        webhook_listen=listen_address(webhook["listen"], "daemon.webhook.listen", located) if webhook else None,
        webhook_secret_env=str((webhook or {}).get("secret_env", "MERGEBOT_WEBHOOK_SECRET")),
        metrics_listen=listen_address(raw["metrics_listen"], "daemon.metrics_listen", located)
        if "metrics_listen" in raw
        else None,
        **durations,
    )


def _target(raw: Any, located: Located, prefix: str) -> Target:
    if not isinstance(raw, dict):
        raise located.error(prefix.rstrip("."), "must be a [[targets]] table")
    unknown = sorted(set(raw) - TARGET_KEYS)
    if unknown:
        raise located.error(f"{prefix}{unknown[0]}", f"unknown key (known: {', '.join(sorted(TARGET_KEYS))})")
    name = raw.get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise located.error(f"{prefix}name", "required: letters, digits, '.', '_' or '-'")
    repo = raw.get("repo")
    if not isinstance(repo, str) or not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", repo):
        raise located.error(f"{prefix}repo", "required: the Hub repo to publish to, as org/name")
    when = raw.get("when", "on_change")
    if when not in ("on_change", "nightly"):
        raise located.error(f"{prefix}when", f"{when!r} is not 'on_change' or 'nightly'")
    validate_raw = raw.get("validate", {})
    if not isinstance(validate_raw, dict) or set(validate_raw) - {"eval_text", "max_ppl_ratio"}:
        raise located.error(f"{prefix}validate", "a table with eval_text and max_ppl_ratio")
    eval_text = DEFAULT_EVAL_TEXT
    if "eval_text" in validate_raw:
        eval_text = (located.path.parent / str(validate_raw["eval_text"])).resolve()
        if not eval_text.is_file():
            raise located.error(f"{prefix}validate.eval_text", f"{eval_text} does not exist")
    ratio = validate_raw.get("max_ppl_ratio", 1.25)
    if not isinstance(ratio, int | float) or isinstance(ratio, bool) or ratio <= 1.0:
        raise located.error(f"{prefix}validate.max_ppl_ratio", "must be a number above 1")
    merge = target_merge(raw, located, prefix)
    digest = hashlib.sha256(
        json.dumps([merge.as_dict(), repo, bool(raw.get("private", False)), str(eval_text), ratio]).encode()
    ).hexdigest()
    return Target(
        name=name,
        repo=repo,
        merge=merge,
        when=when,
        private=bool(raw.get("private", False)),
        validate=ValidateSettings(eval_text, float(ratio)),
        config_hash=digest,
    )
