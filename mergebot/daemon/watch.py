"""What changed upstream: each input's identity now, and the content a merge would read from it (whether that
makes a target due is `decide`'s).

A Hub input costs one cheap `resolve` per (repo, revision) per check; its file listing is fetched once per commit
sha (a commit never changes). A local directory's identity already is a digest of the files a merge reads.
"""

import hashlib
import json
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field

from mergebot import log
from mergebot.config.daemon import Target
from mergebot.config.models import Checkpoint
from mergebot.daemon.state import State
from mergebot.errors import HubError
from mergebot.files import is_merge_input, local_identity
from mergebot.hub.client import HubClient, RetryPolicy


@dataclass(frozen=True)
class RetryUntilStopped(RetryPolicy):
    """The Hub client's backoff, except that no retry starts once the daemon is stopping: a check against an
    unreachable Hub then ends within one backoff of SIGTERM instead of after all its attempts."""

    stopping: threading.Event = field(default_factory=threading.Event)

    def delay(self, attempt: int, retry_after: float | None) -> float:
        if self.stopping.is_set():
            raise HubError("Hub request not retried: the daemon is stopping")
        return super().delay(attempt, retry_after)


@dataclass(frozen=True)
class Inputs:
    """A target's inputs as they are now, by model (repo id or local path)."""

    shas: dict[str, str]
    """The commit sha, or a local directory's identity: what a run records as merged."""
    digests: dict[str, str]
    """A digest of the files a merge reads: what decides whether the target is due."""


def content_digest(hub: HubClient, repo: str, sha: str) -> str:
    """What a merge reads from a revision (weights, index, config, tokenizer), so a README-only commit is no change."""
    files = hub.list_files(repo, sha).files
    read = sorted((name, file.sha256 or file.oid or "") for name, file in files.items() if is_merge_input(name))
    return hashlib.sha256(json.dumps(read).encode()).hexdigest()


class Upstream:
    """Looks at the inputs of targets; each new upstream revision seen is recorded in the state."""

    def __init__(self, state: State) -> None:
        self.state = state
        self.log = log.get("daemon")
        self._digests: dict[tuple[str, str], str] = {}

    def check(self, target: Target, hub: HubClient, resolved: dict[tuple[str, str | None], str]) -> Inputs:
        """The target's inputs now; `resolved` is shared by the targets of one check, so each (repo, revision)
        costs one call."""
        shas, digests = {}, {}
        for spec in target.merge.models:
            parts = [self._identity(checkpoint, hub, resolved) for checkpoint in spec.checkpoints]
            shas[spec.model] = "+".join(sha for sha, _ in parts)  # a LoRA input: its base's, then its adapter's
            digests[spec.model] = parts[0][1] if len(parts) == 1 else _joined(digest for _, digest in parts)
        return Inputs(shas, digests)

    def _identity(
        self, checkpoint: Checkpoint, hub: HubClient, resolved: dict[tuple[str, str | None], str]
    ) -> tuple[str, str]:
        """(what a run records as merged, the digest of what a merge reads) for one checkpoint."""
        if checkpoint.is_local:
            identity = local_identity(checkpoint.local_path)
            return identity, identity
        sha = self._resolve(checkpoint, hub, resolved)
        if (checkpoint.name, sha) not in self._digests:
            self._digests[(checkpoint.name, sha)] = content_digest(hub, checkpoint.name, sha)
        return sha, self._digests[(checkpoint.name, sha)]

    def _resolve(self, checkpoint: Checkpoint, hub: HubClient, resolved: dict[tuple[str, str | None], str]) -> str:
        key = (checkpoint.name, checkpoint.revision)
        if key not in resolved:
            resolved[key] = hub.resolve(checkpoint.name, checkpoint.revision)
            ref = checkpoint.revision or "main"
            if self.state.record_revision(checkpoint.name, ref, resolved[key]):
                self.log.info("new upstream revision", repo=checkpoint.name, ref=ref, sha=resolved[key])
        return resolved[key]


def _joined(digests: Iterable[str]) -> str:
    return hashlib.sha256("+".join(digests).encode()).hexdigest()
