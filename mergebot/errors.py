"""Typed exceptions, caught and reported once at the edges (CLI, daemon job).

Every message is one line that names the file, repo or config key at fault.
"""


class MergebotError(Exception):
    """Base class; `exit_code` is what the CLI exits with."""

    exit_code = 2


class ConfigError(MergebotError):
    """A config file that cannot be read or holds a bad value."""


class ModelError(MergebotError):
    """An input model that cannot be merged: missing tensor, bad shape, corrupt or pickle-only file."""


class UnsafePathError(ModelError):
    """A repo file name that must not touch the disk (absolute, `..`, backslash, odd type)."""


class HubError(MergebotError):
    """A Hub call that still failed after its retries; worth trying again later (exit code 3)."""

    exit_code = 3


class HubNotFoundError(HubError):
    """Repo, revision or file does not exist (or is not visible with this token)."""

    exit_code = 2


class HubAuthError(HubError):
    """401/403: the token is missing, revoked or lacks access."""

    exit_code = 2


class ValidationFailed(MergebotError):
    """The merged model did not pass the gate; nothing may be published."""

    exit_code = 1


class PublishError(MergebotError):
    """Publishing refused or failed; the previous revision stays as it was."""


class StateError(MergebotError):
    """The state directory is locked by another daemon or its database is unusable."""
