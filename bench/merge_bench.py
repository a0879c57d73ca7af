"""Merge benchmark: `mergebot merge` against a yardstick that only reads every input byte and writes the output.

Generates a base and three fine-tunes (Llama-shaped, bf16) and, for each method, runs the yardstick over the same
inputs and then the merge, each as its own process, printing wall time, peak RSS and the ratio to the yardstick.
Targets (issue 4): linear <= 2x the yardstick, ties <= 4x, peak RSS <= 600 MB at both sizes.

    python bench/merge_bench.py --size medium          # ~0.7 GB per model
    python bench/merge_bench.py --size large           # ~1.1B parameters per model
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

SIZES = {
    "small": {"hidden": 256, "layers": 4, "intermediate": 1024, "heads": 8, "kv_heads": 8, "vocab": 32000},
    "medium": {"hidden": 1024, "layers": 16, "intermediate": 4096, "heads": 16, "kv_heads": 16, "vocab": 32000},
    "large": {"hidden": 2048, "layers": 22, "intermediate": 5632, "heads": 32, "kv_heads": 4, "vocab": 32000},
}
SHARD = 1_000_000_000

YARDSTICK = """
import sys
from pathlib import Path
out, size, files = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
buffer = bytearray(64 << 20)
view = memoryview(buffer)
with out.open("wb") as sink:
    for name in files:
        with open(name, "rb") as source:
            while count := source.readinto(buffer):
                if size > 0:
                    sink.write(view[: min(count, size)])
                    size -= min(count, size)
    sink.flush()
    import os
    os.fsync(sink.fileno())
"""


def generate(root: Path, size: str) -> dict[str, Path]:
    """Runs in its own process (see --prepare), so the measuring process never imports torch: a child forked from a
    process holding torch would count that memory in its own peak RSS."""
    from mergebot.dev.synthetic import make_model
    from mergebot.files import FileHashes

    shape = SIZES[size]
    models = {}
    base = root / "base"
    if not (base / "config.json").exists():
        shutil.rmtree(base, ignore_errors=True)
        make_model(base, shard_size=SHARD, **shape)
    models["base"] = base
    for seed in (1, 2, 3):
        path = root / f"ft{seed}"
        if not (path / "config.json").exists():
            shutil.rmtree(path, ignore_errors=True)
            make_model(path, base=base, seed=seed, shard_size=SHARD)
        models[f"ft{seed}"] = path
    hashes = FileHashes(root / "hash-cache")
    for model in models.values():
        for file in model.glob("*.safetensors"):
            hashes.sha256(file)
    return models


def timed(command: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of one child process."""
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    if status != 0:
        raise SystemExit(f"{' '.join(command)} failed: {process.stderr.read().decode()[-2000:]}")
    return wall, usage.ru_maxrss / 1024


def warm_up(files: list[str]) -> None:
    """Read the inputs once so both sides start from the page cache, not from whichever ran first."""
    buffer = bytearray(64 << 20)
    for name in files:
        with open(name, "rb") as source:
            while source.readinto(buffer):
                pass


def method_args(method: str, models: dict[str, Path]) -> tuple[list[str], list[Path]]:
    base, fts = str(models["base"]), [str(models[f"ft{i}"]) for i in (1, 2, 3)]
    if method == "linear":
        sources = [f"{base}:0.25"] + [f"{ft}:0.25" for ft in fts]
        return ["--method", "linear", *sources], [models["base"], *map(Path, fts)]
    if method == "slerp":
        return ["--method", "slerp", "--base-model", base, fts[0], "--set", "t=0.4"], [models["base"], Path(fts[0])]
    sources = [f"{ft}:0.4" for ft in fts]
    return (
        ["--method", method, "--base-model", base, *sources, "--set", "density=0.5"],
        [models["base"], *map(Path, fts)],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="medium")
    parser.add_argument("--methods", default="linear,slerp,ties,dare_ties")
    parser.add_argument("--repeat", type=int, default=1, help="pairs per method; medians are printed")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/mergebot-bench"))
    parser.add_argument("--prepare", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    root = args.workdir / args.size
    root.mkdir(parents=True, exist_ok=True)
    if args.prepare:
        generate(root, args.size)
        return
    started = time.perf_counter()
    prepare = [sys.executable, __file__, "--prepare", "--size", args.size, "--workdir", str(args.workdir)]
    subprocess.run(prepare, check=True)
    models = {name: root / name for name in ("base", "ft1", "ft2", "ft3")}
    input_gb = sum(f.stat().st_size for f in models["base"].glob("*.safetensors")) / 1e9
    elapsed = time.perf_counter() - started
    print(f"size={args.size} per-model={input_gb:.2f} GB (generated and sha256-hashed once in {elapsed:.0f} s)")
    print(f"{'method':<10} {'yardstick s':>11} {'merge s':>8} {'ratio':>6} {'yard RSS MB':>11} {'merge RSS MB':>12}")
    os.environ["MERGEBOT_CACHE_DIR"] = str(root / "hash-cache")
    for method in args.methods.split(","):
        extra, inputs = method_args(method, models)
        files = [str(f) for model in inputs for f in sorted(model.glob("*.safetensors"))]
        warm_up(files)
        yard_times, merge_times, yard_rss, merge_rss = [], [], [], []
        for _ in range(args.repeat):
            out = root / f"out-{method}"
            shutil.rmtree(out, ignore_errors=True)
            shutil.rmtree(root / f".out-{method}.partial", ignore_errors=True)
            out_bytes = sum(f.stat().st_size for f in models["base"].glob("*.safetensors"))
            wall, rss = timed([sys.executable, "-c", YARDSTICK, str(root / "yardstick.out"), str(out_bytes), *files])
            yard_times.append(wall)
            yard_rss.append(rss)
            command = [sys.executable, "-m", "mergebot.cli", "--log-level", "warning", "merge", *extra, str(out)]
            wall, rss = timed([*command, "--out-shard-size", "1GB"])
            merge_times.append(wall)
            merge_rss.append(rss)
        yard, merge = statistics.median(yard_times), statistics.median(merge_times)
        print(
            f"{method:<10} {yard:>11.2f} {merge:>8.2f} {merge / yard:>6.2f} "
            f"{max(yard_rss):>11.0f} {max(merge_rss):>12.0f}",
            flush=True,
        )
    (root / "yardstick.out").unlink(missing_ok=True)


if __name__ == "__main__":
    main()
