"""Progress of long work: one bar with an ETA on a terminal, log lines otherwise (JSON off a terminal).

The merge engine and the gate report what they do; how it is shown is decided here, once, from whether stderr is
a terminal.
"""

import sys
import time

from tqdm import tqdm

from mergebot import log


def _bar_wanted(enabled_bar: bool | None) -> bool:
    return sys.stderr.isatty() if enabled_bar is None else enabled_bar


class ShardProgress:
    """What the engine reports while it works; it does not care how it is shown. On a terminal: one bar over the
    whole merge (bytes written, ETA); otherwise one log line per shard."""

    def __init__(self, enabled_bar: bool | None = None) -> None:
        self._bar_wanted = _bar_wanted(enabled_bar)
        self._bar: tqdm | None = None
        self._started = 0.0
        self._log = log.get("merge")

    def begin(self, shards: int, total_bytes: int) -> None:
        """The whole merge: `shards` output shards of `total_bytes` in all."""
        if self._bar_wanted:
            self._bar = tqdm(
                total=total_bytes, desc=f"merge, {shards} shards", unit="B", unit_scale=True, file=sys.stderr
            )

    def start(self, shard: str, total_bytes: int) -> None:
        self._started = time.monotonic()
        if self._bar is not None:
            self._bar.set_postfix_str(shard, refresh=True)

    def advance(self, nbytes: int) -> None:
        if self._bar is not None:
            self._bar.update(nbytes)

    def done(self, shard: str, outcome: str, nbytes: int) -> None:
        seconds = round(time.monotonic() - self._started, 3)
        if self._bar is None:
            self._log.info("shard", shard=shard, outcome=outcome, bytes=nbytes, seconds=seconds)
        elif outcome != "computed":  # a kept shard's bytes were not counted as they were written
            self._bar.update(nbytes)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class StepProgress:
    """Work in a known number of named steps (the gate's checks and measurements): on a terminal a bar with the
    step in progress and an ETA; otherwise a log line as each step starts."""

    def __init__(self, what: str, total: int, enabled_bar: bool | None = None) -> None:
        self._what, self._total, self._done = what, total, 0
        self._log = log.get(what)
        self._bar = (
            tqdm(total=total, desc=what, unit="step", file=sys.stderr, leave=False)
            if _bar_wanted(enabled_bar)
            else None
        )

    def step(self, name: str) -> None:
        """`name` starts now; the step before it is done."""
        if self._bar is not None:
            self._bar.update(self._done - self._bar.n)
            self._bar.set_postfix_str(name, refresh=True)
        else:
            self._log.info("step", step=name, number=self._done + 1, of=self._total)
        self._done += 1

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
