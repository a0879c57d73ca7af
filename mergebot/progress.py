"""Shard progress: a bar per shard on a terminal, one log line per shard otherwise."""

import sys
import time

from tqdm import tqdm

from mergebot import log


class ShardProgress:
    """What the engine reports while it works; it does not care how it is shown."""

    def __init__(self, enabled_bar: bool | None = None) -> None:
        self._bar_wanted = sys.stderr.isatty() if enabled_bar is None else enabled_bar
        self._bar: tqdm | None = None
        self._started = 0.0
        self._log = log.get("merge")

    def start(self, shard: str, total_bytes: int) -> None:
        self._started = time.monotonic()
        if self._bar_wanted:
            self._bar = tqdm(total=total_bytes, desc=shard, unit="B", unit_scale=True, leave=False, file=sys.stderr)

    def advance(self, nbytes: int) -> None:
        if self._bar is not None:
            self._bar.update(nbytes)

    def done(self, shard: str, outcome: str, nbytes: int) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        seconds = round(time.monotonic() - self._started, 3)
        self._log.info("shard", shard=shard, outcome=outcome, bytes=nbytes, seconds=seconds)
