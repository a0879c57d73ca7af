"""One daemon per state directory: an exclusive flock on `state_dir/daemon.lock`, holding the daemon's pid.

The lock is separate from the database: readers (`mergebot status`) and the daemon's own merge children open the
database without it; only the daemon holds it.
"""

import fcntl
import os
from pathlib import Path

from mergebot.errors import StateError

LOCK_FILE = "daemon.lock"


class DaemonLock:
    """Held until `close()` or the death of the process.

    The kernel drops a flock when its last file descriptor closes, so a SIGKILLed daemon never leaves a stale lock.
    The descriptor is close-on-exec so merge child processes do not inherit it: an orphaned child must not keep
    the lock after its daemon died.
    """

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    def close(self) -> None:
        """Release the lock. Safe to call twice."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def acquire_lock(state_dir: str | Path) -> DaemonLock:
    """Take the single-instance lock of `state_dir` without waiting, and write this pid into the lock file.

    Raises StateError naming the holder's pid when another process holds it. The file is never deleted: removing
    it would let a second daemon lock a fresh inode while the first still holds the old one.
    """
    path = Path(state_dir) / LOCK_FILE
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise StateError(f"cannot open lock file {path}: {e}") from e
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise StateError(f"another mergebot daemon holds {path} (pid {holder})") from None
    except OSError as e:
        os.close(fd)
        raise StateError(f"cannot lock {path}: {e}") from e
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except OSError as e:
        os.close(fd)
        raise StateError(f"cannot write the pid into {path}: {e}") from e
    return DaemonLock(path, fd)


def daemon_pid(state_dir: Path) -> int | None:
    """The pid in the lock file when that process is alive (the daemon holding the lock), else None."""
    try:
        pid = int((state_dir / LOCK_FILE).read_text().strip() or 0)
    except (OSError, ValueError):
        return None
    if pid <= 0:
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return pid
    return pid
