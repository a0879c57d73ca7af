"""The webhooks the devhub posts after each commit, in the Hub's payload format, for the daemon's receiver."""

import json
import logging
import threading
import urllib.request

from mergebot.dev.devhub.store import Commit, Repo

logger = logging.getLogger(__name__)


class Webhooks:
    """Receivers to notify; each POST runs in its own thread so a slow receiver never delays a commit."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._receivers: list[tuple[str, str]] = []

    def add(self, url: str, secret: str) -> None:
        with self._lock:
            self._receivers.append((url, secret))

    def notify(self, repo: Repo, branch: str, commit: Commit, old: str, head: str, base_url: str) -> None:
        """Send the Hub's `repo.content` update payload (v3 fields); `head` is the default branch's commit."""
        with self._lock:
            receivers = list(self._receivers)
        if not receivers:
            return
        payload = {
            "event": {"action": "update", "scope": "repo.content"},
            "repo": {
                "type": repo.type,
                "name": repo.id,
                "id": repo.id,
                "private": repo.private,
                "headSha": head,
                "owner": {"id": repo.id.split("/")[0]},
                "url": {"web": f"{base_url}/{repo.key}", "api": f"{base_url}/api/{repo.type}s/{repo.id}"},
            },
            "updatedRefs": [{"ref": f"refs/heads/{branch}", "oldSha": old, "newSha": commit.id}],
            "webhook": {"id": "devhub", "version": 3},
        }
        body = json.dumps(payload).encode()
        for url, secret in receivers:
            threading.Thread(target=_post, args=(url, secret, body), daemon=True).start()


def _post(url: str, secret: str, body: bytes) -> None:
    request = urllib.request.Request(
        url, data=body, method="POST", headers={"Content-Type": "application/json", "X-Webhook-Secret": secret}
    )
    try:
        with urllib.request.urlopen(request, timeout=10):
            pass
    except OSError as err:  # best effort: a receiver that is down must not break commits
        logger.debug("webhook %s failed: %s", url, err)
