"""Named pause points in the merge child, for tests only: a test holds a real child at a point (to push upstream
meanwhile, or to kill its daemon there) and lets it go on, an ordering without sleeps. Inert unless
MERGEBOT_PAUSE_DIR is set, which only tests do.

In that folder, a file named like the point holds the child there until the test removes it (the child says it
arrived by writing `POINT.reached`); a file `POINT.raise` makes the next child to arrive there raise an unexpected
error (once: the child removes the file).
"""

import os
import time
from pathlib import Path

PAUSE_DIR = "MERGEBOT_PAUSE_DIR"
LIMIT_S = 300.0
"""A test that never lets go of a child still ends: the child goes on after this long."""


def pause_point(name: str) -> None:
    """Wait here while the test's folder holds a file named `name`; raise when it holds `name.raise`."""
    folder = os.environ.get(PAUSE_DIR)
    if not folder:
        return
    hold = Path(folder) / name
    failure = Path(folder) / f"{name}.raise"
    if failure.exists():
        failure.unlink()
        raise RuntimeError(f"test-only failure at pause point {name!r}")
    if not hold.exists():
        return
    (Path(folder) / f"{name}.reached").write_text(str(os.getpid()))
    deadline = time.monotonic() + LIMIT_S
    while hold.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
