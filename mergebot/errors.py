"""Typed exceptions, caught and reported once at the edges (CLI, daemon job).

Every message is one line that names the file, repo or config key at fault.
"""

from enum import IntEnum, unique


@unique
class ExitCode(IntEnum):
    """What a mergebot process exits with; the daemon decides on a merge child's code alone."""

    OK = 0
    VALIDATION_FAILED = 1
    """The gate refused the merge (nothing was published), or `once` found a target that failed."""
    PERMANENT = 2
    """Bad config or input: running again changes nothing until the input or the config changes."""
    RETRY_LATER = 3
    """The Hub or the machine had trouble (network, disk full): the same run may succeed later."""
    HELD = 4
    """The merge is worse than the last published one, or an input got worse since then: the daemon holds the
    target at its published revision until an input changes or a person releases it."""
    INTERNAL_ERROR = 70
    """An unexpected exception (a bug in mergebot or a library): its traceback is logged; the daemon records the
    run as an internal error and retries it with backoff, as a transient failure."""
    PARENT_GONE = 75
    """A merge child found its daemon gone before it started."""
    INTERRUPTED = 130


UNHEALTHY = ExitCode.VALIDATION_FAILED
"""`status --health`: no daemon holds the state. The same number as VALIDATION_FAILED, named apart: 1 is what a
container health check reads as unhealthy."""


class MergebotError(Exception):
    """Base class; `exit_code` is what the CLI exits with."""

    exit_code = ExitCode.PERMANENT


class ConfigError(MergebotError):
    """A config file that cannot be read or holds a bad value."""


class ConfigErrors(ConfigError):
    """Every problem found in one config, reported together (each its own line, naming file, line and key)."""

    def __init__(self, problems: list[ConfigError], warnings: tuple[str, ...] = ()) -> None:
        super().__init__("\n".join(map(str, problems)))
        self.problems = problems
        self.warnings = warnings
        """What the config also sets that is ignored (one line each), to report with the problems."""


class ModelError(MergebotError):
    """An input model that cannot be merged: missing tensor, bad shape, corrupt or pickle-only file."""


class UnsafePathError(ModelError):
    """A repo file name that must not touch the disk (absolute, `..`, backslash, odd type)."""


class FileLimitError(ModelError):
    """A file over the size, or JSON nested deeper than, mergebot reads (see `files.size_limit`)."""


class HubError(MergebotError):
    """A Hub call that still failed after its retries; worth trying again later."""

    exit_code = ExitCode.RETRY_LATER


class HubRefusedError(MergebotError):
    """The Hub answered, and no retry changes the answer until the repo, the revision or the token does."""


class HubNotFoundError(HubRefusedError):
    """Repo, revision or file does not exist (or is not visible with this token)."""


class HubRepoNotFoundError(HubNotFoundError):
    """The repo itself does not exist on the endpoint (or is not visible with this token)."""


class HubAuthError(HubRefusedError):
    """401/403: the token is missing, revoked or lacks access."""


class PublishError(MergebotError):
    """Publishing refused or failed; the previous revision stays as it was."""


class StateError(MergebotError):
    """The state directory is locked by another daemon or its database is unusable."""


class DiskFullError(MergebotError):
    """The disk filled up while writing; finished work is kept and a later run resumes from it."""

    exit_code = ExitCode.RETRY_LATER


class ClusterError(MergebotError):
    """The Ray cluster of `executor = "ray"` cannot be reached; it may be back later."""

    exit_code = ExitCode.RETRY_LATER


class GgufError(MergebotError):
    """A GGUF file could not be written from a merge (its safetensors, config or tokenizer is unusable for it)."""


class GgufUnsupportedError(GgufError):
    """The merge's architecture, tokenizer or a requested GGUF type is one mergebot does not convert."""
