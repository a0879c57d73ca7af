"""What the devhub served and received, so tests can assert what was (and was not) downloaded or uploaded."""

import threading
from collections import Counter, defaultdict
from typing import Any


class Stats:
    """Thread-safe counters: requests per route kind, bytes served and bytes uploaded per (repo, file)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self._requests: Counter[str] = Counter()
            self._by_method: Counter[str] = Counter()
            self._served: defaultdict[str, Counter[str]] = defaultdict(Counter)
            self._received: defaultdict[str, Counter[str]] = defaultdict(Counter)
            self._unclaimed: Counter[tuple[str, str]] = Counter()  # LFS bytes until a commit names their path
            self._xorbs: Counter[tuple[str, str]] = Counter()  # Xet xorb bytes until a commit names a file in them

    def request(self, kind: str, method: str) -> None:
        with self._lock:
            self._requests[kind] += 1
            self._by_method[f"{method} {kind}"] += 1

    def served(self, repo: str, path: str, size: int) -> None:
        with self._lock:
            self._served[repo][path] += size

    def received(self, repo: str, path: str, size: int) -> None:
        with self._lock:
            self._received[repo][path] += size

    def lfs_uploaded(self, repo: str, sha256: str, size: int) -> None:
        with self._lock:
            self._unclaimed[(repo, sha256)] += size

    def lfs_committed(self, repo: str, path: str, sha256: str) -> None:
        with self._lock:
            self._received[repo][path] += self._unclaimed.pop((repo, sha256), 0)

    def xorb_uploaded(self, repo: str, xorb: str, size: int) -> None:
        with self._lock:
            self._xorbs[(repo, xorb)] += size

    def xet_committed(self, repo: str, path: str, xorbs: list[str]) -> None:
        """Count a new xorb for the first committed file that reads it (the client packs several files in one)."""
        with self._lock:
            self._received[repo][path] += sum(self._xorbs.pop((repo, xorb), 0) for xorb in dict.fromkeys(xorbs))

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "requests": dict(self._requests),
                "requests_by_method": dict(self._by_method),
                "bytes_served": {repo: dict(files) for repo, files in self._served.items()},
                "bytes_served_total": sum(sum(files.values()) for files in self._served.values()),
                "bytes_received": {repo: dict(files) for repo, files in self._received.items()},
            }
