"""Reading the daemon's config file, at start and again on SIGHUP or an edit.

A reload never stops the daemon: a file that cannot be read (an editor's save leaves it missing for a moment, or
not UTF-8) or that holds a problem is logged, one line per problem, and the running config stays. So does an edit
of a setting only read at start (the state directory, the listeners, the executor, the polling and cron triggers,
the merge slots): adopting the rest would leave the daemon running on a mix that no file says.
"""

from pathlib import Path

from mergebot import log
from mergebot.config.daemon import DaemonConfig, check_daemon_config
from mergebot.config.document import read_config_text
from mergebot.errors import ConfigError

RESTART_ONLY = {
    "state_dir": "daemon.state_dir",
    "poll_interval": "daemon.poll_interval",
    "schedule": "daemon.schedule",
    "max_concurrent_merges": "daemon.max_concurrent_merges",
    "webhook_listen": "daemon.webhook.listen",
    "webhook_secret_env": "daemon.webhook.secret_env",
    "metrics_listen": "daemon.metrics_listen",
    "status_page": "daemon.status_page",
    "ray": "daemon.executor",
}
"""DaemonSettings fields read once at start, by the config key that sets them."""

_log = log.get("daemon")


def read_config(path: Path) -> tuple[DaemonConfig, str]:
    """The config and the text it was read from, which the merge children are handed; the first problem is
    raised."""
    text = read_config_text(path)
    config, problems = check_daemon_config(path, text)
    if problems or config is None:
        raise problems[0]
    return config, text


def reread(path: Path, running: DaemonConfig) -> tuple[DaemonConfig, str] | None:
    """The edited config and its text to adopt, or None when the running config stays (and the log says why)."""
    try:
        text = read_config_text(path)
        config, problems = check_daemon_config(path, text)
    except ConfigError as error:
        config, problems = None, [error]
    except Exception as error:  # e.g. nesting deep enough to exhaust the parser: a reload must not stop the daemon
        config, problems = None, [ConfigError(f"{path}: cannot read config ({type(error).__name__})")]
    if problems or config is None:
        for problem in problems:
            _log.error("config rejected, keeping the running one", problem=str(problem))
        return None
    before, after = running.daemon, config.daemon
    changed = [key for name, key in RESTART_ONLY.items() if getattr(before, name) != getattr(after, name)]
    if changed:
        _log.error("config change needs a restart, keeping the running one", path=str(path), keys=changed)
        return None
    return config, text
