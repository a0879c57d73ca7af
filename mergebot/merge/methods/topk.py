"""Exact top-k of magnitudes over a whole tensor, streamed: two histogram passes over float32 bit patterns."""

import itertools
from collections.abc import Callable, Iterable

import torch

from mergebot.merge.methods.shared import histogram_pick


def float_bits(values: torch.Tensor) -> torch.Tensor:
    """Bit patterns of non-negative float32 values, whose integer order is the values' order."""
    return values.contiguous().view(torch.int32)


_SORT_AT_MOST = 1 << 16


def _sorted_cut(bits: torch.Tensor, k: int) -> tuple[int, int, int]:
    ordered = torch.sort(bits.reshape(-1), descending=True).values
    threshold = int(ordered[k - 1])
    return threshold, int((bits > threshold).sum()), k


def top_cuts(
    streams: Callable[[], Iterable[list[torch.Tensor]]], choose_ks: Callable[[int], list[int]]
) -> list[tuple[int, int, int]]:
    """(threshold bits, entries above it, k) per stream, with k chosen once the element count is known.

    A histogram of the high 16 bits finds the bucket of the k-th largest, a second pass over that bucket's low 16
    bits finds the exact value (faster than sorting for a large tensor, even in one block). A tensor that comes as
    one small block (a norm, a bias) is sorted instead: two 65,536-bucket histograms cost more than it has
    elements."""
    passes = iter(streams())
    first = next(passes)
    second = next(passes, None)
    if second is None and first and first[0].numel() <= _SORT_AT_MOST:
        return [_sorted_cut(bits, k) for bits, k in zip(first, choose_ks(first[0].numel()), strict=True)]
    buckets = 1 << 16
    high: torch.Tensor | None = None
    for bits in itertools.chain([first], [second] if second is not None else [], passes):
        if high is None:
            high = torch.zeros(len(bits), buckets, dtype=torch.int64)
        for index, stream_bits in enumerate(bits):
            high[index] += torch.bincount((stream_bits >> 16).reshape(-1), minlength=buckets)
    assert high is not None
    ks = choose_ks(int(high[0].sum()))
    picks = [histogram_pick(high[index].numpy(), k) for index, k in enumerate(ks)]
    low = torch.zeros(len(ks), buckets, dtype=torch.int64)
    for bits in streams():
        for index, stream_bits in enumerate(bits):
            in_bucket = stream_bits[(stream_bits >> 16) == picks[index][0]]
            low[index] += torch.bincount(in_bucket & 0xFFFF, minlength=buckets)
    results = []
    for index, (k, (bucket, above_bucket)) in enumerate(zip(ks, picks, strict=True)):
        low_bits, above_low = histogram_pick(low[index].numpy(), k - above_bucket)
        results.append(((bucket << 16) | low_bits, above_bucket + above_low, k))
    return results
