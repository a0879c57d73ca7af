"""Publish benchmark: the real model's merge (SmolLM2-135M-Instruct and its "code" fine-tune, linear, ~270 MB in
shards) published to a local Hub through Xet (the default) and through LFS (`HF_HUB_DISABLE_XET=1`, a repo without
Xet storage), then re-published after one tensor of one shard changed (through Xet also from a client with an empty
cache, which learns what the Hub holds only from its global dedupe). For each: seconds, and the bytes the Hub
received (Xet: the xorbs, compressed, only the chunks it lacked; LFS: whole files). Then, from the Xet repo, a
fresh download of the merge and of the re-published revision as mergebot downloads (its own GET through the resolve
route, into one reader's cache): the bytes served, to show that only the changed shard is fetched again. Every
publish and download runs in its own process with its own HF_HOME (huggingface_hub reads the variable once, at
import), as a daemon's child would.

    python bench/xet_bench.py            # ~1 min once the real model is cached (mergebot demo builds it)
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mergebot.dev.devhub import DevHub

SHARD_SIZE = "50MB"
QUIET = {"HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_TOKEN": "x"}


def child(action: str, url: str, repo: str, folder: str) -> None:
    """In its own process: publish every file of `folder` (or only the shard named by `MERGEBOT_BENCH_ONLY`), or
    fetch the repo's head into `folder`."""
    from mergebot.hub.client import HubClient

    client = HubClient(endpoint=url, token="x", cache_dir=Path(folder) / "cache" if action == "fetch" else None)
    started = time.monotonic()
    if action == "publish":
        only = os.environ.get("MERGEBOT_BENCH_ONLY")
        files = {p.name: p for p in Path(folder).iterdir() if p.is_file() and (not only or p.name == only)}
        client.create_repo(repo, private=False)
        client.commit(repo, files, [], "publish", None)
    else:
        client.fetch(client.list_files(repo, client.resolve(repo)))
    print(json.dumps({"s": time.monotonic() - started}))


def run(action: str, hub: DevHub, repo: str, folder: Path, home: Path, **env: str) -> float:
    command = [sys.executable, __file__, action, hub.url, repo, str(folder)]
    environment = {**os.environ, **QUIET, "HF_HOME": str(home), **env}
    done = subprocess.run(command, env=environment, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{action} of {repo} failed: {done.stderr[-3000:]}")
    return json.loads(done.stdout.splitlines()[-1])["s"]


def merge(root: Path) -> Path:
    from mergebot.dev import realmodel

    out = root / "merge"
    base, code = realmodel.base_model(), realmodel.fine_tune("code")
    command = ["merge", "--method", "linear", f"{base}:0.5", f"{code}:0.5", out, "--out-shard-size", SHARD_SIZE]
    done = subprocess.run([sys.executable, "-m", "mergebot.cli", *map(str, command)], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"the merge failed: {done.stderr[-3000:]}")
    return out


def change_one_tensor(folder: Path) -> str:
    """Scale the smallest tensor of the middle shard: one shard changes, most of its bytes do not."""
    from safetensors.torch import load_file, save_file

    shards = sorted(folder.glob("model-*.safetensors"))
    shard = shards[len(shards) // 2]
    tensors = load_file(shard)
    name = min(tensors, key=lambda n: tensors[n].numel())
    tensors[name] = tensors[name] * 1.5
    save_file(tensors, shard, metadata={"format": "pt"})
    with shard.open("rb") as file:
        size = int.from_bytes(file.read(8), "little")
        start, end = json.loads(file.read(size))[name]["data_offsets"]
    print(f"changed {name} in {shard.name}: bytes {8 + size + start}..{8 + size + end} of the file")
    return shard.name


def measure(root: Path, merged: Path, mode: str, rows: list) -> list[str]:
    """Publish, download (Xet only), change one tensor, re-publish, download again, on a Hub of its own; "xet-fresh"
    re-publishes from a client with an empty cache (only the Hub's global dedupe tells it what the Hub holds)."""
    env = {"HF_HUB_DISABLE_XET": "1"} if mode == "lfs" else {}
    folder = root / f"merge-{mode}"
    shutil.copytree(merged, folder)
    with DevHub(root / f"hub-{mode}") as hub:
        hub.create_repo("me/merge", xet=mode != "lfs")
        steps = ["publish", "download", "change", "re-publish", "re-download"]
        for step in steps if mode == "xet" else ["publish", "change", "re-publish"]:
            hub.reset_stats()
            if step == "change":
                shard = change_one_tensor(folder)
                before = hub.xet_ranges("me/merge", shard) if mode != "lfs" else {}
                continue
            if step.endswith("publish"):
                only = {"MERGEBOT_BENCH_ONLY": shard} if step == "re-publish" else {}
                fresh = "-fresh" if mode == "xet-fresh" and step == "re-publish" else ""
                seconds = run("publish", hub, "me/merge", folder, root / f"home-{mode}{fresh}", **env, **only)
                label = step + (" (empty cache)" if fresh else "")
                rows.append((mode.split("-")[0], label, seconds, sent(hub.stats(), "me/merge")))
            else:  # one reader's cache, as the daemon's: the second download finds the unchanged shards in it
                seconds = run("fetch", hub, "me/merge", root / "reader", root / "home-reader")
                served = hub.stats()["bytes_served"].get("me/merge", {})
                rows.append((mode, step, seconds, sum(served.values())))
        if mode != "xet":
            return []
        after = hub.xet_ranges("me/merge", shard)
        old = sum(n for x, n in after.items() if x in before)
        return [
            f"{shard} ({(folder / shard).stat().st_size / 1e6:.1f} MB) before the change: {len(before)} xorb(s), "
            f"{sum(before.values()) / 1e6:.2f} MB of ranges; after: {len(after)} xorb(s), "
            f"{sum(after.values()) / 1e6:.2f} MB of ranges, {old / 1e6:.2f} MB of them in xorbs it had before",
            f"re-download served, per file: {', '.join(f'{name} {n / 1e6:.2f} MB' for name, n in served.items())}",
        ]


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="mergebot-xet-bench-"))
    try:
        merged = merge(root)
        shards = sorted(merged.glob("*.safetensors"))
        print(f"merge: {sum(p.stat().st_size for p in shards) / 1e6:.1f} MB of weights in {len(shards)} shards")
        rows: list = []
        notes = measure(root, merged, "xet", rows)
        measure(root, merged, "xet-fresh", rows)
        measure(root, merged, "lfs", rows)
        print(f"{'path':5} {'step':26} {'seconds':>8} {'MB sent':>8}")
        for mode, step, seconds, size in rows:
            print(f"{mode:5} {step:26} {seconds:8.2f} {size / 1e6:8.2f}")
        print("\n".join(notes))
    finally:
        shutil.rmtree(root, ignore_errors=True)


def sent(stats: dict, repo: str) -> int:
    """What the client sent for the files: xorbs through Xet, whole objects through LFS, and small files inline."""
    xorbs = stats["xorb_bytes_received"].get(repo, 0)
    received = stats["bytes_received"].get(repo, {})
    return xorbs + sum(n for path, n in received.items() if not xorbs or not path.endswith(".safetensors"))


if __name__ == "__main__":
    if len(sys.argv) == 5:
        child(*sys.argv[1:])
    else:
        main()
