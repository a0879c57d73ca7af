"""`mergebot demo`: the main job end to end on an embedded local Hub, offline, in about a minute.

A base model and two fine-tunes are generated and pushed to a local Hub; the daemon merges a SLERP and a TIES
target, validates and publishes them; then one fine-tune gets a new revision that changes one shard, and the
daemon re-merges only what that shard feeds and publishes again.
"""

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tqdm import tqdm

from mergebot.daemon.children import stop_process

SHARD_BYTES = 400_000
TIMEOUT = 300.0


def _say(message: str) -> None:
    print(message, flush=True)


def _config(state_dir: Path) -> str:
    return f"""# Written by `mergebot demo`.
[daemon]
state_dir = "{state_dir}"
poll_interval = "2s"
debounce = "0s"
stop_grace = "10s"

[[targets]]
name = "demo-slerp"
repo = "demo/merged-slerp"
merge_method = "slerp"
base_model = "demo/base"
models = [{{ model = "demo/base" }}, {{ model = "demo/chat" }}]
parameters = {{ t = [{{ filter = "self_attn", value = [0.0, 0.5, 0.3, 0.7, 1.0] }}, {{ value = 0.5 }}] }}
out_shard_size = "1MB"

[[targets]]
name = "demo-ties"
repo = "demo/merged-ties"
merge_method = "ties"
base_model = "demo/base"
models = [
  {{ model = "demo/chat", parameters = {{ weight = 0.6, density = 0.5 }} }},
  {{ model = "demo/code", parameters = {{ weight = 0.4, density = 0.5 }} }},
]
out_shard_size = "1MB"
"""


class _Watch:
    """Reads the daemon's state to follow its runs."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir

    def finished_runs(self, target: str) -> list:
        from mergebot.daemon.state import STATE_FILE, State

        if not (self.state_dir / STATE_FILE).exists():
            return []
        try:
            with State.open(self.state_dir, readonly=True) as state:
                return [run for run in state.runs(target) if run.outcome != "running"]
        except Exception:
            return []

    def wait(self, targets: list[str], count: int, daemon: subprocess.Popen, label: str) -> dict:
        deadline = time.monotonic() + TIMEOUT
        done: dict = {}
        bar_off = not sys.stdout.isatty()
        with tqdm(total=len(targets), desc=label, unit="target", file=sys.stdout, leave=False, disable=bar_off) as bar:
            while len(done) < len(targets):
                if daemon.poll() is not None:
                    raise RuntimeError(f"the daemon exited with code {daemon.returncode}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"timed out: {label}")
                for target in targets:
                    runs = self.finished_runs(target)
                    if target not in done and len(runs) >= count:
                        done[target] = runs[0]
                        bar.update(1)
                time.sleep(0.2)
        for target, run in done.items():
            if run.outcome not in ("published", "unchanged"):
                raise RuntimeError(f"{target}: run {run.outcome}: {run.reason}")
        return done


def run_demo(keep: bool) -> int:
    root = Path(tempfile.mkdtemp(prefix="mergebot-demo-"))
    os.environ.update(
        {
            "HF_HOME": str(root / "hf-home"),
            "HF_HUB_DISABLE_XET": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1",
            "MERGEBOT_CACHE_DIR": str(root / "cache"),
            "HF_TOKEN": "demo-token",
        }
    )
    from huggingface_hub import HfApi

    from mergebot.dev.devhub import DevHub
    from mergebot.dev.synthetic import make_model

    started = time.monotonic()
    daemon: subprocess.Popen | None = None
    hub = DevHub(root / "hub").start()
    try:
        os.environ["HF_ENDPOINT"] = hub.url
        _say(f"1. Local Hub running at {hub.url} (repos under {root / 'hub'})")
        upstream = root / "upstream"
        base = make_model(upstream / "base", hidden=256, layers=8, intermediate=512, shard_size=SHARD_BYTES)
        chat = make_model(upstream / "chat", base=base, seed=1, noise=0.05, shard_size=SHARD_BYTES)
        code = make_model(upstream / "code", base=base, seed=2, noise=0.05, shard_size=SHARD_BYTES)
        api = HfApi(endpoint=hub.url, token="demo-token")
        for name, path in (("base", base), ("chat", chat), ("code", code)):
            api.create_repo(f"demo/{name}", exist_ok=True)
            api.upload_folder(repo_id=f"demo/{name}", folder_path=path, commit_message="initial upload")
        size = sum(p.stat().st_size for p in base.glob("*.safetensors")) / 1e6
        _say(f"2. Pushed demo/base and two fine-tunes, demo/chat and demo/code ({size:.1f} MB each, 8 layers)")

        config = root / "mergebot.toml"
        state_dir = root / "state"
        config.write_text(_config(state_dir))
        _say(f"3. Config with a SLERP and a TIES target: {config}")
        log_path = root / "daemon.log"
        with log_path.open("w") as log_file:
            daemon = subprocess.Popen(
                [sys.executable, "-m", "mergebot.cli", "run", "--config", str(config)],
                stdout=log_file,
                stderr=log_file,
            )
        _say(f"4. Daemon started (pid {daemon.pid}, log {log_path}); waiting for the first merges")
        watch = _Watch(state_dir)
        hub.reset_stats()
        first = watch.wait(["demo-slerp", "demo-ties"], 1, daemon, "merge, validate, publish")
        first_bytes = hub.stats()["bytes_served_total"]
        for target, run in first.items():
            _describe(target, run)

        shard = sorted(chat.glob("model-*.safetensors"))[3]
        _change_values(shard)
        hub.reset_stats()
        new_sha = api.upload_folder(repo_id="demo/chat", folder_path=chat, commit_message="improve layer 2").oid
        _say(f"5. Pushed a new revision of demo/chat ({new_sha[:12]}) that changes only {shard.name}")
        second = watch.wait(["demo-slerp", "demo-ties"], 2, daemon, "re-merge the changed shards")
        second_bytes = hub.stats()["bytes_served_total"]
        for target, run in second.items():
            _describe(target, run)

        _say("\nSummary")
        _say(
            f"  downloaded from the Hub: {first_bytes / 1e6:.1f} MB first, {second_bytes / 1e6:.1f} MB after the update"
        )
        for target in ("demo-slerp", "demo-ties"):
            details = second[target].details or {}
            total = len(details.get("computed", [])) + len(details.get("reused", []))
            _say(
                f"  {target}: revision {first[target].published_sha[:12]} → {second[target].published_sha[:12]}; "
                f"update recomputed {len(details.get('computed', []))} of {total} shards"
            )
        _say(f"  merged files: {state_dir / 'targets'}  ·  local Hub: {root / 'hub'}")
        _say(f"  finished in {time.monotonic() - started:.0f} s")
        return 0
    finally:
        stop_process(daemon, 30)
        hub.stop()
        if keep:
            _say(f"  kept {root}: mergebot.toml, daemon.log, state/, hub/ (browse: mergebot devhub --root {root}/hub)")
        else:
            shutil.rmtree(root, ignore_errors=True)


def _describe(target: str, run) -> None:
    details = run.details or {}
    parents = ", ".join(f"{name} {ppl:.1f}" for name, ppl in (details.get("parent_ppl") or {}).items() if ppl)
    _say(
        f"   {target}: {run.outcome} {(run.published_sha or '')[:12]} · shards computed "
        f"{len(details.get('computed', []))}, reused {len(details.get('reused', []))} · "
        f"perplexity {details.get('merge_ppl') or 0:.1f} (parents: {parents})"
    )


def _change_values(shard: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(shard)
    save_file({name: tensor * 1.05 for name, tensor in tensors.items()}, shard, metadata={"format": "pt"})
