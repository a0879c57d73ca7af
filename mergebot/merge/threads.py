"""The one pool of worker threads a merge computes on: sized from the CPUs this process may use, or
$MERGEBOT_THREADS. The fused loops release the GIL, so a block's element range is split across it."""

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from typing import TypeVar

from mergebot.errors import ConfigError

T = TypeVar("T")
ALIGN = 2048
"""Ranges start on multiples of this many elements (the fused loops' scratch size)."""


@cache
def thread_count() -> int:
    configured = os.environ.get("MERGEBOT_THREADS")
    if configured:
        if not configured.isdigit() or int(configured) < 1:
            raise ConfigError(f"MERGEBOT_THREADS: {configured!r} is not a positive whole number")
        return int(configured)
    return len(os.sched_getaffinity(0))


@cache
def use_torch_threads() -> None:
    """torch computes with the same number of threads as the pool (only one of the two works at a time); called
    on the first tensor that takes a torch path, so a merge without one never imports torch."""
    import torch

    torch.set_num_threads(thread_count())


@cache
def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(thread_count(), thread_name_prefix="merge")


def split(total: int, align: int = ALIGN) -> list[tuple[int, int]]:
    """[lo, hi) ranges covering 0..total, starting on multiples of `align`, one per thread (fewer for a small
    block)."""
    if total <= 0:
        return [(0, 0)]
    parts = max(1, min(thread_count(), total // align))
    step = -(-total // parts // align) * align
    return [(lo, min(lo + step, total)) for lo in range(0, total, step)]


def each_range(work: Callable[[int, int], T], total: int, align: int = ALIGN) -> list[T]:
    """`work(lo, hi)` for each range of `split(total, align)`, on the pool; results in range order."""
    ranges = split(total, align)
    if len(ranges) == 1:
        return [work(*ranges[0])]
    return list(_pool().map(lambda bounds: work(*bounds), ranges))
