"""structlog set-up: readable lines on a terminal, JSON lines otherwise (systemd journal, Docker, files).

Also `redact`, the one place credentials are taken out of text that leaves the process: every log line passes
through it, and so do the reasons the daemon records, the status it shows and the events it sends.
"""

import logging
import re
import sys
from contextlib import AbstractContextManager
from typing import Any

import structlog

REDACTED = "***"
_USERINFO = re.compile(r"(\b[a-z][a-z0-9+.-]*://)[^/\s?#@]*(?:@[^/\s?#@]*)*@", re.IGNORECASE)
"""`scheme://user:password@` (the last `@` before the host ends it, as in URL parsing)."""
_QUERY_SECRET = re.compile(
    r"([?&;](?:access_?token|token|api_?key|key|secret|password|passwd|sig|signature|auth)=)[^&;#\s'\"]+",
    re.IGNORECASE,
)
_HF_TOKEN = re.compile(r"\bhf_[A-Za-z0-9]{30,}\b")


def configure(level: str = "info") -> None:
    """Log to stderr; JSON unless stderr is a terminal."""
    renderer = (
        structlog.dev.ConsoleRenderer(colors=True) if sys.stderr.isatty() else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            _redact_event,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=_stderr_logger,
        cache_logger_on_first_use=False,
    )


def _stderr_logger(*_args: object) -> structlog.PrintLogger:
    """Looks up sys.stderr on every use, so a replaced stream (tests, daemon redirection) is honoured."""
    return structlog.PrintLogger(sys.stderr)


def get(name: str) -> structlog.typing.FilteringBoundLogger:
    return structlog.get_logger(name)


def bound(**values: object) -> AbstractContextManager[None]:
    """Every line logged inside the block carries `values` (e.g. the stage of a multi-stage merge)."""
    return structlog.contextvars.bound_contextvars(**values)


def tag(**values: object) -> None:
    """Every line this process logs from now on carries `values` (the daemon's child: its target and run)."""
    structlog.contextvars.bind_contextvars(**values)


def redact(text: str) -> str:
    """`text` without the credentials a URL may carry (`user:password@`, `?token=`) and without Hub tokens."""
    text = _USERINFO.sub(rf"\1{REDACTED}@", text)
    text = _QUERY_SECRET.sub(rf"\1{REDACTED}", text)
    return _HF_TOKEN.sub(f"hf_{REDACTED}", text)


def redact_value(value: Any) -> Any:
    """`redact` applied to every string inside dicts, lists and tuples (a log line's values, a JSON payload); any
    other object but a number is redacted as its text."""
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, dict):
        return {key: redact_value(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [redact_value(item) for item in value]
    return redact(str(value))


def _redact_event(_logger: object, _name: str, event: dict[str, Any]) -> dict[str, Any]:
    """The structlog processor: after the traceback is formatted, before the line is rendered."""
    return redact_value(event)
