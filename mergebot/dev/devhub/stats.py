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
            self._xorbs_served: defaultdict[str, Counter[str]] = defaultdict(Counter)
            self._received: defaultdict[str, Counter[str]] = defaultdict(Counter)
            self._unclaimed: Counter[tuple[str, str]] = Counter()  # LFS bytes until a commit names their path
            self._xorbs: set[tuple[str, str]] = set()  # new Xet xorbs until a commit names a file in them
            self._xorb_bytes: Counter[str] = Counter()  # what Xet uploads sent, per repo

    def request(self, kind: str, method: str) -> None:
        with self._lock:
            self._requests[kind] += 1
            self._by_method[f"{method} {kind}"] += 1

    def served(self, repo: str, path: str, size: int) -> None:
        """A file's bytes (a resolve GET, a Xet reconstruction), or with `xet:REPO` a xorb's bytes."""
        with self._lock:
            (self._xorbs_served[repo[4:]] if repo.startswith("xet:") else self._served[repo])[path] += size

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
            self._xorbs.add((repo, xorb))
            self._xorb_bytes[repo] += size

    def xet_committed(self, repo: str, files: list[tuple[str, int, list[str]]]) -> None:
        """A commit's Xet files (path, size, xorbs read): each one reading a new xorb counts as received whole, as
        an LFS upload does (the client packs several files in one xorb, and sends only the chunks it lacks)."""
        with self._lock:
            new = {(repo, xorb) for _, _, xorbs in files for xorb in xorbs} & self._xorbs
            for path, size, xorbs in files:
                if any((repo, xorb) in new for xorb in xorbs):
                    self._received[repo][path] += size
            self._xorbs -= new

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "requests": dict(self._requests),
                "requests_by_method": dict(self._by_method),
                "bytes_served": {repo: dict(files) for repo, files in self._served.items()},
                "xorb_bytes_served": {repo: dict(xorbs) for repo, xorbs in self._xorbs_served.items()},
                "bytes_served_total": sum(sum(files.values()) for files in self._served.values()),
                "bytes_received": {repo: dict(files) for repo, files in self._received.items()},
                "xorb_bytes_received": dict(self._xorb_bytes),
            }
