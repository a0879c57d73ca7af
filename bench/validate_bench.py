"""Validation time and peak anonymous memory, on the real model and on a ~1B-parameter synthetic one.

`mergebot validate` runs as its own process; a sampler reads its RssAnon (memory that is not a mapped file: what a
model larger than RAM could not page out) and VmHWM every 20 ms. The merge under test is a linear 50/50 merge of two
fine-tunes, so the gate measures two parents and the merge. The parents' signature cache is cleared first, so
every model is measured.

    .venv/bin/python bench/validate_bench.py [--skip-large]
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def sample_peak(pid: int, stop: threading.Event, peaks: dict[str, int]) -> None:
    while not stop.is_set():
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            return
        for key in ("RssAnon", "VmHWM"):
            match = re.search(rf"{key}:\s+(\d+) kB", status)
            if match:
                peaks[key] = max(peaks.get(key, 0), int(match.group(1)))
        stop.wait(0.02)


def run_measured(command: list[str], env: dict[str, str]) -> tuple[float, dict[str, int], int]:
    peaks: dict[str, int] = {}
    stop = threading.Event()
    started = time.monotonic()
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    sampler = threading.Thread(target=sample_peak, args=(process.pid, stop, peaks))
    sampler.start()
    code = process.wait()
    stop.set()
    sampler.join()
    return time.monotonic() - started, peaks, code


def bench(label: str, first: Path, second: Path, work: Path) -> None:
    env = os.environ | {"MERGEBOT_CACHE_DIR": str(work / "cache"), "MERGEBOT_LOG_LEVEL": "warning"}
    out = work / f"{label}-merged"
    cli = [sys.executable, "-m", "mergebot.cli"]
    subprocess.run(
        [*cli, "merge", "--method", "linear", f"{first}:0.5", f"{second}:0.5", str(out)], env=env, check=True
    )
    shutil.rmtree(work / "cache" / "signatures", ignore_errors=True)
    seconds, peaks, code = run_measured([*cli, "validate", str(out)], env)
    params = sum(p.stat().st_size for p in out.glob("*.safetensors")) / 2 / 1e6
    print(
        f"{label:<8} {params:>7.0f}M params  validate {seconds:6.1f} s (exit {code})  "
        f"peak anonymous {peaks.get('RssAnon', 0) / 1024:6.0f} MB  peak RSS {peaks.get('VmHWM', 0) / 1024:6.0f} MB",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--skip-large", action="store_true", help="only the real model")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from mergebot.dev import realmodel
    from mergebot.dev.synthetic import make_model

    with tempfile.TemporaryDirectory(prefix="mergebot-validate-bench-") as temp:
        work = Path(temp)
        bench("real", realmodel.fine_tune("code"), realmodel.fine_tune("licenses"), work)
        if not args.skip_large:
            base = make_model(work / "large-a", hidden=2048, layers=22, heads=32, kv_heads=4, intermediate=5632)
            other = make_model(work / "large-b", base=base, seed=1)
            bench("1.1B", base, other, work)


if __name__ == "__main__":
    main()
