"""The daemon's config file: `[daemon]` settings and `[[targets]]`, each target a merge plus where and when it is
published and how it is checked. Everything is checked offline, with the key and line of each problem.

Defaults live on the dataclasses: the parser passes only the keys a file sets.
"""

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from mergebot.config.chain import reads, target_names, upstream_first
from mergebot.config.document import Located, listen_address, parse_duration, read_document
from mergebot.config.executor import RaySettings, executor_settings
from mergebot.config.gguf import GGUF_KEYS, GgufSettings, gguf_settings, llama_cpp_installed
from mergebot.config.merge import MERGE_KEYS, MergeConfig, target_merge
from mergebot.config.models import Names
from mergebot.config.moe import MoeConfig
from mergebot.errors import ConfigError, ConfigErrors

DURATION_KEYS = ("poll_interval", "merge_timeout", "stop_grace", "debounce", "retry_delay")
COUNT_KEYS = ("max_concurrent_merges", "max_retries")
DAEMON_KEYS = {
    "state_dir",
    "schedule",
    "hub_endpoint",
    "read_endpoint",
    "read_token_env",
    "webhook",
    "metrics_listen",
    "status_page",
    "executor",
    "ray",
    *DURATION_KEYS,
    *COUNT_KEYS,
}
WEBHOOK_KEYS = {"listen", "secret_env"}
VALIDATE_KEYS = {
    "eval_text", "max_ppl_ratio", "max_parent_ratio", "max_kl", "max_input_jump", "max_regression",
    "probe_prompts", "min_stop_ratio", "min_eot_ratio", "accept_config_fields", "max_weight_outlier",
}  # fmt: skip
TARGET_KEYS = {"name", "repo", "when", "private", "validate", "mergekit_config", *GGUF_KEYS} | MERGE_KEYS
NOTIFY_KEYS = {"url", "format", "events", "secret_env", "secret_header"}
NOTIFY_FORMATS = ("json", "slack", "discord")
NOTIFY_EVENTS = ("published", "held", "failed", "recovered")


@dataclass(frozen=True)
class ValidateSettings:
    """How a merge is checked before it is published; also the defaults of `mergebot validate` and `publish`."""

    eval_text: Path = Path(__file__).parent.parent / "data" / "eval.txt"
    max_ppl_ratio: float = 1.25
    """A merge may be somewhat worse than its weakest parent (interpolating two fine-tunes often costs a little),
    but a broken merge (wrong tokenizer rows, mis-scaled tensors, a layer from the wrong model) lands at several
    times the parents' perplexity: 1.25 x the worst healthy parent tolerates the first and catches the second."""
    max_parent_ratio: float = 4.0
    """A parent this many times worse than the best parent is suspect (a broken upload lands at hundreds of times;
    a fine-tune for another domain is rarely twice as bad on general text), and a merge of it is refused."""
    max_kl: float = 0.5
    """Nats per token: the mean KL divergence of the merge's next-token distribution from its nearest parent's.
    Merges of related fine-tunes stay far below; a merge that lost its parents' behaviour is well above."""
    max_input_jump: float = 1.5
    """The daemon holds a target when an input's perplexity grew by more than this factor since the last publish."""
    max_regression: float = 1.25
    """The daemon holds a target when the merge is this many times worse than the last published merge."""
    max_weight_outlier: float = 20.0
    """A parent one of whose tensors is this many times farther from the nearest other model than a typical tensor
    is suspect (`mergebot.pipeline.distance`): a fine-tune moves its tensors alike, damage moves one far."""
    probe_prompts: Path = Path(__file__).parent.parent / "data" / "probe.json"
    """The behaviour probe's chat prompts and reference answers (`mergebot.pipeline.probe.read_prompts`)."""
    min_stop_ratio: float = 0.5
    """The merge must end its turn on at least this share of the prompts its best healthy parent ends it on (and
    of the last published merge's, in the daemon). Healthy merges stop as often as their parents; one that lost its
    end-of-turn token stops on none."""
    min_eot_ratio: float = 0.25
    """The merge's end-of-turn probability after a reference answer, at least this share of its best parent's."""
    accept_config_fields: tuple[str, ...] = ()
    """Fields (`rope_theta`, `config.eos_token_id`, or a bare `eos_token_id` for every file) the parents may
    disagree on: the user has looked and chosen the merge's value."""


@dataclass(frozen=True)
class Target:
    """One merged model the daemon keeps up to date: where it is published, when it runs, how it is checked."""

    name: str
    repo: str
    merge: MergeConfig | MoeConfig
    config_hash: str
    """Changes whenever anything that shapes the published result changes."""
    when: str = "on_change"
    private: bool = False
    validate: ValidateSettings = field(default_factory=ValidateSettings)
    reads: tuple[str, ...] = ()
    """The targets whose merges this one reads (`target:NAME` models)."""
    gguf: GgufSettings | None = None
    """The GGUF files published beside the merge (None: none)."""


@dataclass(frozen=True)
class DaemonSettings:
    state_dir: Path
    poll_interval: float = 900.0
    schedule: str = "0 3 * * *"
    hub_endpoint: str | None = None
    """Where merges are published and the published repos read back (None: HF_ENDPOINT, else the Hub)."""
    read_endpoint: str | None = None
    """Where upstream repos are read (resolve, list, download), often a mirror; None: `hub_endpoint`."""
    read_token_env: str | None = None
    """The variable holding the token for `read_endpoint`. None: the publish token (HF_TOKEN) when both endpoints
    are the same, and no token at all to another one, so the publish token never reaches a mirror."""
    max_concurrent_merges: int = 1
    merge_timeout: float = 6 * 3600.0
    stop_grace: float = 30.0
    debounce: float = 60.0
    retry_delay: float = 300.0
    max_retries: int = 5
    webhook_listen: tuple[str, int] | None = None
    webhook_secret_env: str = "MERGEBOT_WEBHOOK_SECRET"
    metrics_listen: tuple[str, int] | None = None
    status_page: bool = False
    """Serve the status page (/ and /status.json) on the metrics listener."""
    ray: RaySettings | None = None
    """Set with executor = "ray": each run is a task on that Ray cluster; None runs it beside the daemon."""


@dataclass(frozen=True)
class NotifySettings:
    """One receiver of the daemon's events (a `[[notify]]` table)."""

    url: str
    format: str = "json"
    """json (mergebot's own payload), slack or discord (their incoming-webhook shapes)."""
    events: tuple[str, ...] = NOTIFY_EVENTS
    secret_env: str | None = None
    """The environment variable whose value is sent in `secret_header`; the config file names it, never holds it."""
    secret_header: str = "X-Mergebot-Secret"


@dataclass(frozen=True)
class DaemonConfig:
    path: Path
    daemon: DaemonSettings
    targets: dict[str, Target]
    notify: tuple[NotifySettings, ...] = ()
    warnings: tuple[str, ...] = ()
    """What the targets set that is ignored, as mergekit ignores it: one line each."""


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
    problems = located.unknown_keys(document, {"daemon", "targets", "notify"}, "")
    notify: list[NotifySettings] = []
    raw_notify = document.get("notify", [])
    if not isinstance(raw_notify, list):
        problems.append(located.error("notify", "must be a list of [[notify]] tables"))
        raw_notify = []
    for index, raw in enumerate(raw_notify):
        try:
            notify.append(_notify_settings(raw, located, f"notify[{index}]."))
        except ConfigError as error:
            problems.append(error)
    raw_targets = document.get("targets", [])
    if not isinstance(raw_targets, list):
        return None, [*problems, located.error("targets", "must be a list of [[targets]] tables")]
    targets: dict[str, Target] = {}
    warnings: list[str] = []
    positions = {raw.get("name"): number for number, raw in enumerate(raw_targets) if isinstance(raw, dict)}
    names = target_names(daemon.state_dir, [name for name in positions if isinstance(name, str)])
    for index, raw in enumerate(raw_targets):
        try:
            target = _target(raw, located, f"targets[{index}].", names)
            if target.name in targets:
                raise located.error(f"targets[{index}].name", f"{target.name!r} is used by two targets")
            if daemon.ray is not None and target.reads:
                read = f"target:{target.reads[0]}"
                why = "needs executor = 'local': a merge made on a Ray worker stays on that worker"
                raise located.error(f"targets[{index}].model", f"{read} {why}", value=read)
            targets[target.name] = target
            warnings.extend(target.merge.warnings)
        except ConfigErrors as error:
            problems.extend(error.problems)
            warnings.extend(error.warnings)
        except ConfigError as error:
            problems.append(error)
    try:
        order = upstream_first({name: target.reads for name, target in targets.items()}, positions, located)
        targets = {name: targets[name] for name in order}
    except ConfigError as error:
        problems.append(error)
    return DaemonConfig(path, daemon, targets, tuple(notify), tuple(warnings)), problems


def _daemon_settings(raw: Any, located: Located) -> DaemonSettings:
    if not isinstance(raw, dict):
        raise located.error("daemon", "must be a table")
    located.check_keys(raw, DAEMON_KEYS, "daemon.")
    state_dir = os.environ.get("MERGEBOT_STATE_DIR") or raw.get("state_dir")
    if not state_dir:
        raise located.error("daemon.state_dir", "required (or set MERGEBOT_STATE_DIR)")
    if not isinstance(state_dir, str):
        raise located.error("daemon.state_dir", "must be a directory path")
    settings: dict[str, Any] = {
        key: parse_duration(raw[key], f"daemon.{key}", located) for key in DURATION_KEYS if key in raw
    }
    for key in COUNT_KEYS:
        if key in raw:
            if not isinstance(raw[key], int) or isinstance(raw[key], bool) or raw[key] < 1:
                raise located.error(f"daemon.{key}", "must be a whole number >= 1")
            settings[key] = raw[key]
    if "schedule" in raw:
        settings["schedule"] = _schedule(raw["schedule"], located)
    settings |= _endpoints(raw, located)
    if "metrics_listen" in raw:
        settings["metrics_listen"] = listen_address(raw["metrics_listen"], "daemon.metrics_listen", located)
    if "status_page" in raw:
        if not isinstance(raw["status_page"], bool):
            raise located.error("daemon.status_page", "must be true or false")
        if raw["status_page"] and "metrics_listen" not in raw:
            raise located.error("daemon.status_page", "needs daemon.metrics_listen: the page is served on it")
        settings["status_page"] = raw["status_page"]
    if "webhook" in raw:
        settings |= _webhook(raw["webhook"], located)
    if "executor" in raw or "ray" in raw:
        settings["ray"] = executor_settings(raw, located)
    return DaemonSettings(state_dir=(located.path.parent / Path(state_dir).expanduser()).resolve(), **settings)


def _schedule(value: Any, located: Located) -> str:
    """A cron expression, checked the way the scheduler will read it."""
    # Imported here: `mergebot merge` reads this module for the validate defaults and must not load the scheduler.
    from apscheduler.triggers.cron import CronTrigger

    schedule = str(value)
    try:
        CronTrigger.from_crontab(schedule)
    except ValueError as error:
        raise located.error("daemon.schedule", f"{schedule!r} is not a cron expression ({error})") from error
    return schedule


def _endpoints(raw: dict, located: Located) -> dict[str, Any]:
    """The publish endpoint, the read endpoint and the read token's variable, as DaemonSettings fields."""
    settings: dict[str, Any] = {}
    for key, example in (("hub_endpoint", "https://huggingface.co"), ("read_endpoint", "https://hf-mirror.com")):
        if key in raw:
            if not isinstance(raw[key], str) or not re.fullmatch(r"https?://[^\s/]+(/\S*)?", raw[key]):
                raise located.error(f"daemon.{key}", f"must be a URL like '{example}'")
            settings[key] = raw[key]
    if "read_token_env" in raw:
        if not isinstance(raw["read_token_env"], str) or not re.fullmatch(r"[A-Za-z_]\w*", raw["read_token_env"]):
            raise located.error("daemon.read_token_env", "must name the environment variable with the read token")
        settings["read_token_env"] = raw["read_token_env"]
    return settings


def _webhook(raw: Any, located: Located) -> dict[str, Any]:
    """The [daemon.webhook] table as DaemonSettings fields."""
    if not isinstance(raw, dict):
        raise located.error("daemon.webhook", "must be a table with listen and secret_env")
    located.check_keys(raw, WEBHOOK_KEYS, "daemon.webhook.")
    if "listen" not in raw:
        raise located.error("daemon.webhook.listen", "required: the host:port to receive webhooks on")
    settings: dict[str, Any] = {"webhook_listen": listen_address(raw["listen"], "daemon.webhook.listen", located)}
    if "secret_env" in raw:
        if not isinstance(raw["secret_env"], str) or not raw["secret_env"]:
            raise located.error("daemon.webhook.secret_env", "must name the environment variable with the secret")
        settings["webhook_secret_env"] = raw["secret_env"]
    return settings


def _notify_settings(raw: Any, located: Located, prefix: str) -> NotifySettings:
    if not isinstance(raw, dict):
        raise located.error(prefix.rstrip("."), "must be a [[notify]] table")
    located.check_keys(raw, NOTIFY_KEYS, prefix)
    url = raw.get("url")
    try:
        parts = urlsplit(url) if isinstance(url, str) else None
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise located.error(f"{prefix}url", "required: the http(s) URL to POST each event to")
    if "@" in parts.netloc:
        why = "must not hold user:password@ (a URL's credentials are not sent): use secret_env and secret_header"
        raise located.error(f"{prefix}url", why)
    settings: dict[str, Any] = {}
    if "format" in raw:
        if raw["format"] not in NOTIFY_FORMATS:
            raise located.error(f"{prefix}format", f"{raw['format']!r} is not one of {', '.join(NOTIFY_FORMATS)}")
        settings["format"] = raw["format"]
    if "events" in raw:
        events = raw["events"]
        if not isinstance(events, list) or not events or not set(map(str, events)) <= set(NOTIFY_EVENTS):
            raise located.error(f"{prefix}events", f"must be a list of some of {', '.join(NOTIFY_EVENTS)}")
        settings["events"] = tuple(event for event in NOTIFY_EVENTS if event in events)
    for key in ("secret_env", "secret_header"):
        if key in raw:
            if not isinstance(raw[key], str) or not re.fullmatch(r"[A-Za-z0-9_-]+", raw[key]):
                raise located.error(f"{prefix}{key}", "must be a name: letters, digits, '_' or '-'")
            settings[key] = raw[key]
    if "secret_header" in settings and "secret_env" not in settings:
        raise located.error(f"{prefix}secret_header", "needs secret_env: the variable holding the header's value")
    return NotifySettings(url, **settings)


def _target(raw: Any, located: Located, prefix: str, names: Names) -> Target:
    if not isinstance(raw, dict):
        raise located.error(prefix.rstrip("."), "must be a [[targets]] table")
    located.check_keys(raw, TARGET_KEYS, prefix)
    name = raw.get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise located.error(f"{prefix}name", "required: letters, digits, '.', '_' or '-'")
    repo = raw.get("repo")
    if not isinstance(repo, str) or not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", repo):
        raise located.error(f"{prefix}repo", "required: the Hub repo to publish to, as org/name")
    settings: dict[str, Any] = {}
    if "when" in raw:
        if raw["when"] not in ("on_change", "nightly"):
            raise located.error(f"{prefix}when", f"{raw['when']!r} is not 'on_change' or 'nightly'")
        settings["when"] = raw["when"]
    if "private" in raw:
        if not isinstance(raw["private"], bool):
            raise located.error(f"{prefix}private", "must be true or false")
        settings["private"] = raw["private"]
    validate_raw = raw.get("validate", {})
    validate = _validate_settings(validate_raw, located, f"{prefix}validate.")
    merge = target_merge(raw, located, prefix, names)
    gguf = gguf_settings(raw, located, prefix, repo, quantizer=llama_cpp_installed())
    # The ratio as written (2, not 2.0), as the hash has always been taken: a changed hash re-runs the target.
    ratio = validate_raw.get("max_ppl_ratio", validate.max_ppl_ratio)
    private = settings.get("private", Target.private)
    shaping = [merge.as_dict(), repo, private, str(validate.eval_text), ratio]
    limits = {key: value for key, value in validate_raw.items() if key not in ("eval_text", "max_ppl_ratio")}
    shaping += ([limits] if limits else []) + ([gguf.digest_part] if gguf else [])  # so old hashes stay
    digest = hashlib.sha256(json.dumps(shaping).encode()).hexdigest()
    return Target(name, repo, merge, digest, validate=validate, reads=reads(merge), gguf=gguf, **settings)


def _validate_settings(raw: Any, located: Located, prefix: str) -> ValidateSettings:
    if not isinstance(raw, dict):
        raise located.error(prefix.rstrip("."), "must be a table of validation settings")
    located.check_keys(raw, VALIDATE_KEYS, prefix)
    settings: dict[str, Any] = {}
    if "eval_text" in raw:
        eval_text = (located.path.parent / str(raw["eval_text"])).resolve()
        if not eval_text.is_file():
            raise located.error(f"{prefix}eval_text", f"{eval_text} does not exist")
        settings["eval_text"] = eval_text
    for key, minimum in (("max_ppl_ratio", 1.0), ("max_parent_ratio", 1.0), ("max_input_jump", 1.0),
                         ("max_regression", 1.0), ("max_kl", 0.0), ("max_weight_outlier", 1.0)):  # fmt: skip
        if key in raw:
            value = raw[key]
            if not isinstance(value, int | float) or isinstance(value, bool) or value <= minimum:
                raise located.error(f"{prefix}{key}", f"must be a number above {minimum:g}")
            settings[key] = float(value)
    for key in ("min_stop_ratio", "min_eot_ratio"):
        if key in raw:
            value = raw[key]
            if not isinstance(value, int | float) or isinstance(value, bool) or not 0 <= value <= 1:
                raise located.error(f"{prefix}{key}", "must be a number from 0 to 1")
            settings[key] = float(value)
    if "probe_prompts" in raw:
        prompts = (located.path.parent / str(raw["probe_prompts"])).resolve()
        if not prompts.is_file():
            raise located.error(f"{prefix}probe_prompts", f"{prompts} does not exist")
        settings["probe_prompts"] = prompts
    if "accept_config_fields" in raw:
        fields = raw["accept_config_fields"]
        if not isinstance(fields, list) or not all(isinstance(f, str) and f.strip() for f in fields):
            raise located.error(f"{prefix}accept_config_fields", "must be a list of config field names")
        settings["accept_config_fields"] = tuple(fields)
    return ValidateSettings(**settings)
