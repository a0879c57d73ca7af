"""What `merge_bench.py` measures beyond one merge's wall time: the validation gate with cold caches, and a TIES merge
from start to exit at Mistral-7B's tensor shapes beside mergekit-yaml's.

"Cold" here: the page cache cannot be dropped for the whole machine without root, so every file the step reads (the
merge's and each parent's safetensors) is flushed and then dropped from it with posix_fadvise(DONTNEED), and the
gate's cache of parent signatures is emptied, so every model is read from disk and measured. Python, torch and
transformers themselves stay as warm as the machine left them.
"""

import contextlib
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from validate_bench import sample_peak

MISTRAL = {"hidden": 4096, "intermediate": 14336, "heads": 32, "kv_heads": 8, "vocab": 32000}
"""Mistral-7B's shapes (it has 32 layers; the benchmark makes as few as the disk allows)."""
PEAK_KEYS = ("RssAnon", "VmHWM")


def drop_from_cache(directories: list[Path]) -> None:
    """Flush each safetensors file of these directories and drop its pages from the page cache."""
    for directory in directories:
        for path in directory.glob("*.safetensors"):
            descriptor = os.open(path, os.O_RDONLY)
            try:
                with contextlib.suppress(OSError):
                    os.fdatasync(descriptor)
                os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(descriptor)


def measured(command: list[str]) -> tuple[float, dict[str, float]]:
    """Wall seconds, and the child's peak anonymous memory (RssAnon, sampled every 20 ms) and peak RSS, in MB."""
    peaks: dict[str, int] = {}
    stop = threading.Event()
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    sampler = threading.Thread(target=sample_peak, args=(process.pid, stop, peaks))
    sampler.start()
    _, error = process.communicate()
    stop.set()
    sampler.join()
    wall = time.perf_counter() - started
    if process.returncode not in (0, 1):  # 1: the gate ran and failed the merge, still a measurement
        raise SystemExit(f"{' '.join(command)} failed: {error.decode()[-2000:]}")
    return wall, {key: peaks.get(key, 0) / 1024 for key in PEAK_KEYS}


def parameters(model: Path) -> int:
    """Parameters of a bfloat16 checkpoint, from its files' sizes (headers are a rounding error)."""
    return sum(path.stat().st_size for path in model.glob("*.safetensors")) // 2


def validation_line(merged: Path, parents: list[Path], cache: Path) -> str:
    """`mergebot validate` of a merge with cold caches: seconds per billion parameters read (merge + parents)."""
    shutil.rmtree(cache / "signatures", ignore_errors=True)
    drop_from_cache([merged, *parents])
    command = [sys.executable, "-m", "mergebot.cli", "--log-level", "warning", "validate", str(merged)]
    wall, peaks = measured(command)
    billions = sum(parameters(model) for model in (merged, *parents)) / 1e9
    return (
        f"validate (cold) {wall:.1f} s for {billions:.2f} B parameters (merge + {len(parents)} parents): "
        f"{wall / billions:.1f} s per billion, peak anonymous {peaks['RssAnon']:.0f} MB, "
        f"peak RSS {peaks['VmHWM']:.0f} MB"
    )
