"""structlog set-up: readable lines on a terminal, JSON lines otherwise (systemd journal, Docker, files)."""

import logging
import sys
from contextlib import AbstractContextManager

import structlog


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
