"""Hub benchmark: `mergebot merge` from Hub repo ids served by a local Hub (`mergebot devhub`, its own process).

Generates a base and a fine-tune (~0.75 GB bf16 each, 200 MB upstream shards) in a `--prepare` process (the measuring
process never imports torch) and uploads them. Then times three slerp merges, each its own process: `first` (cold HF
cache), `re-merge` after one upstream shard of the fine-tune changed (a new revision pushed with upload_folder), and
`no-change` (nothing changed upstream). For each: seconds, bytes the Hub served (weights / other, from devhub's stats
over HTTP), output shards computed/reused, seconds inside shards (the rest is start-up and fetching), peak RSS. With
--repeat N the three runs are repeated (cold cache again, the same shard changed again) and medians are printed.
Target (issue 5): re-merge <= affected/all output shards x first + 2 s, and the no-change check downloads 0 bytes of
weights. Everything lives in one temporary folder, removed at exit.

    python bench/hub_bench.py                          # ~2 min, ~4 GB of temporary disk
    python bench/hub_bench.py --repeat 3               # medians of three rounds, for a busy machine
    python bench/hub_bench.py --layers 8 --tmp /data   # smaller models, temporary files elsewhere
"""

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from mergebot.daemon.children import stop_process

SHAPE = {"hidden": 1024, "intermediate": 4096, "heads": 16, "kv_heads": 16, "vocab": 32000}
INDEX = "model.safetensors.index.json"
COLUMNS = {"s": (7, 2), "shard s": (7, 2), "weights MB": (10, 1), "other KB": (9, 1), "calls": (6, 0)}
COLUMNS |= {"computed": (8, 0), "reused": (6, 0), "RSS MB": (7, 0)}  # name: (width, decimals)
QUIET = {
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "HF_TOKEN": "x",
}
HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never through a proxy


def prepare(root: Path, step: str, layers: int, shard: int, change: int) -> None:
    """Runs in its own process: torch and the upload client stay out of the measuring process (see merge_bench)."""
    from huggingface_hub import HfApi

    api = HfApi(endpoint=os.environ["HF_ENDPOINT"], token="x")
    upstream = root / "upstream"
    if step == "generate":
        from mergebot.dev.synthetic import make_model

        make_model(upstream / "base", layers=layers, shard_size=shard, **SHAPE)
        make_model(upstream / "ft", base=upstream / "base", seed=1, shard_size=shard)
        names = ("base", "ft")
    else:
        from safetensors.torch import load_file, save_file

        path = changed_shard(root, change)
        save_file({k: v * 1.5 for k, v in load_file(path).items()}, path, metadata={"format": "pt"})
        names = ("ft",)
    for name in names:
        api.create_repo(f"org/{name}", exist_ok=True)
        api.upload_folder(repo_id=f"org/{name}", folder_path=upstream / name, commit_message=step)


def changed_shard(root: Path, index: int) -> Path:
    return sorted((root / "upstream" / "ft").glob("model-*.safetensors"))[index]


def affected_shards(root: Path, out: Path, index: int) -> tuple[int, int]:
    """(output shards that read a tensor of the changed upstream shard, all output shards), from the two indexes."""
    changed = changed_shard(root, index).name
    upstream = json.loads((root / "upstream" / "ft" / INDEX).read_text())["weight_map"]
    output = json.loads((out / INDEX).read_text())["weight_map"]
    return len({output[t] for t, file in upstream.items() if file == changed}), len(set(output.values()))


def hub(url: str, method: str = "GET") -> dict:
    with HTTP.open(urllib.request.Request(f"{url}/_devhub/stats", method=method), timeout=30) as response:
        return json.load(response)


def run_child(command: list[str], env: dict[str, str], log: Path) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of one child process; killed if the benchmark is interrupted."""
    started = time.perf_counter()
    with log.open("w") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=sink, env=env)
        try:
            _, status, usage = os.wait4(process.pid, 0)
        except BaseException:
            process.kill()
            process.wait()
            raise
    wall = time.perf_counter() - started
    if status != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{log.read_text()[-3000:]}")
    return wall, usage.ru_maxrss / 1024


def merge(url: str, env: dict[str, str], out: Path, log: Path, shard_size: str) -> dict:
    hub(url, "DELETE")
    command = [sys.executable, "-m", "mergebot.cli", "merge", "--method", "slerp", "--base-model", "org/base"]
    wall, rss = run_child([*command, "org/ft", "--set", "t=0.5", str(out), "--out-shard-size", shard_size], env, log)
    stats = hub(url)
    served = [(path, n) for files in stats["bytes_served"].values() for path, n in files.items()]
    weights = sum(n for path, n in served if path.endswith(".safetensors"))
    events = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    shards = [e for e in events if e.get("event") == "shard"]
    outcomes = [e["outcome"] for e in shards]
    return {
        "s": wall,
        "shard s": sum(e["seconds"] for e in shards),
        "weights MB": weights / 1e6,
        "other KB": (stats["bytes_served_total"] - weights) / 1e3,
        "calls": sum(stats["requests"].values()),
        "computed": outcomes.count("computed"),
        "reused": len(outcomes) - outcomes.count("computed"),
        "RSS MB": rss,
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_devhub(root: Path, env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    port, log = free_port(), root / "devhub.log"
    command = [sys.executable, "-m", "mergebot.cli", "devhub", "--root", str(root / "hub"), "--port", str(port)]
    process = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 60
    while not log.read_text().startswith("devhub serving"):
        if process.poll() is not None or time.monotonic() > deadline:
            stop_process(process, 15)
            raise SystemExit(f"devhub did not start:\n{log.read_text()[-2000:]}")
        time.sleep(0.2)
    return process, f"http://127.0.0.1:{port}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=18, help="18 → ~0.75 GB per model")
    parser.add_argument("--upstream-shard-mb", type=int, default=200)
    parser.add_argument("--out-shard-size", default="200MB")
    parser.add_argument("--change", type=int, default=1, help="which upstream shard of the fine-tune changes")
    parser.add_argument("--repeat", type=int, default=1, help="rounds; medians are printed")
    parser.add_argument("--tmp", type=Path, default=None, help="parent of the temporary folder")
    parser.add_argument("--prepare", choices=["generate", "change"], help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.prepare:
        prepare(args.root, args.prepare, args.layers, args.upstream_shard_mb * 1_000_000, args.change)
        return

    for stop_signal in (signal.SIGTERM, signal.SIGINT):  # both end in `finally`, which stops every child
        signal.signal(stop_signal, lambda signum, _: sys.exit(128 + signum))
    root = Path(tempfile.mkdtemp(prefix="mergebot-hub-bench-", dir=args.tmp))
    devhub = None
    try:
        env = os.environ | QUIET | {"HF_HOME": str(root / "hf-home"), "MERGEBOT_CACHE_DIR": str(root / "cache")}
        devhub, url = start_devhub(root, env)
        env["HF_ENDPOINT"] = url
        own = [sys.executable, __file__, "--root", str(root), "--layers", str(args.layers)]
        own += ["--change", str(args.change), "--upstream-shard-mb", str(args.upstream_shard_mb)]
        started = time.perf_counter()
        run_child([*own, "--prepare", "generate"], env, root / "prepare.log")
        shards = [f.stat().st_size for f in (root / "upstream" / "ft").glob("*.safetensors")]
        print(
            f"per-model={sum(shards) / 1e9:.2f} GB in {len(shards)} upstream shards, generated and uploaded in "
            f"{time.perf_counter() - started:.0f} s; load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores"
        )
        out, rounds = root / "out", []
        for round_ in range(args.repeat):
            for cold in (out, root / "hf-home", root / "cache"):
                shutil.rmtree(cold, ignore_errors=True)
            runs = {"first": merge(url, env, out, root / f"first{round_}.log", args.out_shard_size)}
            run_child([*own, "--prepare", "change"], env, root / "change.log")
            runs["re-merge"] = merge(url, env, out, root / f"remerge{round_}.log", args.out_shard_size)
            runs["no-change"] = merge(url, env, out, root / f"nochange{round_}.log", args.out_shard_size)
            rounds.append(runs)
        affected, total = affected_shards(root, out, args.change)

        print(f"{'run':<10}", *(f"{name:>{width}}" for name, (width, _) in COLUMNS.items()))
        median = {run: {k: statistics.median(r[run][k] for r in rounds) for k in COLUMNS} for run in rounds[0]}
        for run, values in median.items():
            print(f"{run:<10}", *(f"{values[k]:>{w}.{d}f}" for k, (w, d) in COLUMNS.items()))
        if args.repeat > 1:
            for run in median:
                print(f"{run} s per round:", ", ".join(f"{r[run]['s']:.2f}" for r in rounds))
        first, again = median["first"], median["re-merge"]
        budget = affected / total * first["s"] + 2.0
        verdict = "PASS" if again["s"] <= budget else "MISS"
        print(
            f"re-merge: {again['s']:.2f} s <= {affected}/{total} x {first['s']:.2f} + 2 = {budget:.2f} s: {verdict} "
            f"(ratio {again['s'] / budget:.2f}; computed {again['computed']:.0f} of {total}, affected {affected})"
        )
        weights = max(r["no-change"]["weights MB"] for r in rounds) * 1e6
        print(f"no-change: {weights:.0f} bytes of weights downloaded (target 0): {'PASS' if weights == 0 else 'MISS'}")
        print(f"load average at the end {os.getloadavg()[0]:.2f}")
    finally:
        if devhub is not None:
            stop_process(devhub, 15)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
