"""`mergebot demo`: the main job end to end with a real model on an embedded local Hub, offline.

SmolLM2-135M-Instruct and two short real fine-tunes of it (mergebot.dev.realmodel, built once per machine in the
user's cache) are pushed to a local Hub in shards; the real daemon merges them, validates and publishes, and the
published merge is asked a question. Then one fine-tune gets an update that changes one shard, and the daemon
re-merges only the output shard it feeds; then a broken revision of that fine-tune is pushed, and the daemon holds
the target at its published revision and says which input is to blame. Any other outcome fails the demo.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tqdm import tqdm

from mergebot.daemon.children import stop_process
from mergebot.errors import MergebotError
from mergebot.files import INDEX_FILE, SINGLE_FILE, default_cache_dir

TIMEOUT = 300.0
LAYERS_PER_SHARD = 6
"""Input shards hold six decoder layers each (the first: embeddings and final norm), about 42 MB."""
OUT_SHARD_SIZE = "45MB"
"""Six layers fit, seven do not: each output shard holds the same layers as one input shard."""
QUESTION = "What is the capital of France?"
RETOUCH = 1.01
"""The update scales one shard's tensors by this: a small real change, harmless to the model."""
TOKEN = "demo-token"
BASE, CODE, LICENSES = "demo/smollm2", "demo/smollm2-code", "demo/smollm2-licenses"
TARGET, MERGED = "smollm2-ties", "demo/smollm2-ties"


class DemoError(MergebotError):
    """An outcome the demo expects did not happen (the CLI prints it and exits non-zero)."""


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
name = "{TARGET}"
repo = "{MERGED}"
merge_method = "ties"
base_model = "{BASE}"
models = [
  {{ model = "{CODE}", parameters = {{ weight = 0.5, density = 0.7 }} }},
  {{ model = "{LICENSES}", parameters = {{ weight = 0.5, density = 0.7 }} }},
]
out_shard_size = "{OUT_SHARD_SIZE}"
"""


class _Watch:
    """Follows the daemon's runs of the target by reading its state, as `mergebot status` does."""

    def __init__(self, state_dir: Path, daemon: subprocess.Popen, log_path: Path) -> None:
        self.state_dir, self.daemon, self.log_path = state_dir, daemon, log_path

    def _finished_runs(self) -> list:
        from mergebot.daemon.state import STATE_FILE, State

        if not (self.state_dir / STATE_FILE).exists():
            return []
        try:
            with State.open(self.state_dir, readonly=True) as state:
                return [run for run in state.runs(TARGET) if run.outcome != "running"]
        except MergebotError:
            return []  # the daemon is still creating the database

    def next_run(self, count: int, label: str, expected: tuple[str, ...]):
        """Wait for the target's `count`-th finished run; fail the demo unless its outcome is one of `expected`."""
        deadline = time.monotonic() + TIMEOUT
        with tqdm(
            desc=label, file=sys.stdout, leave=False, disable=not sys.stdout.isatty(), bar_format="{desc} {elapsed}"
        ) as bar:
            while len(runs := self._finished_runs()) < count:
                if self.daemon.poll() is not None:
                    raise DemoError(f"the daemon exited with code {self.daemon.returncode}; see {self.log_path}")
                if time.monotonic() > deadline:
                    raise DemoError(f"timed out after {TIMEOUT:.0f} s: {label}; see {self.log_path}")
                bar.refresh()
                time.sleep(0.2)
        run = runs[0]
        if run.outcome not in expected:
            raise DemoError(f"{label}: expected {' or '.join(expected)}, the run was {run.outcome}: {run.reason}")
        return run


def _shard(src: Path, dst: Path) -> Path:
    """`src` (one model.safetensors) rewritten as LAYERS_PER_SHARD-layer shards with an index, as large models are
    uploaded, so an update to a few layers changes one file. Tied embeddings stay tied: no lm_head is added."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    groups: dict[int, dict] = {}
    with safe_open(src / SINGLE_FILE, framework="pt") as reader:
        for name in reader.keys():  # noqa: SIM118 (not a dict)
            layer = re.match(r"model\.layers\.(\d+)\.", name)
            group = 0 if layer is None else 1 + int(layer[1]) // LAYERS_PER_SHARD
            groups.setdefault(group, {})[name] = reader.get_tensor(name)
    dst.mkdir(parents=True)
    weight_map: dict[str, str] = {}
    for number, tensors in sorted(groups.items()):
        file = f"model-{number + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file(tensors, dst / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file))
    total = sum(t.nbytes for tensors in groups.values() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (dst / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    for file in src.iterdir():
        if file.is_file() and file.name != SINGLE_FILE:
            shutil.copyfile(file, dst / file.name)
    return dst


def _middle_shard(model_dir: Path) -> str:
    """The shard holding the middle layer: the one the update retouches and `realmodel.broken_copy` breaks."""
    layers = json.loads((model_dir / "config.json").read_text())["num_hidden_layers"]
    return json.loads((model_dir / INDEX_FILE).read_text())["weight_map"][
        f"model.layers.{layers // 2}.mlp.down_proj.weight"
    ]


def _retouch(shard: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(shard)
    save_file({name: tensor * RETOUCH for name, tensor in tensors.items()}, shard, metadata={"format": "pt"})


def run_demo(keep: bool) -> int:
    real_cache = default_cache_dir()  # the user's cache: the real model is built once per machine, not per demo
    root = Path(tempfile.mkdtemp(prefix="mergebot-demo-"))
    os.environ.update(
        {
            "HF_HOME": str(root / "hf-home"),
            "HF_HUB_DISABLE_XET": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1",
            "MERGEBOT_CACHE_DIR": str(root / "cache"),
            "HF_TOKEN": TOKEN,
        }
    )
    # huggingface_hub reads the environment once, at import: only now may it (and transformers) be imported.
    from huggingface_hub import HfApi, snapshot_download

    from mergebot.config.daemon import load_daemon_config
    from mergebot.daemon.status import collect_status
    from mergebot.dev import realmodel
    from mergebot.dev.devhub import DevHub

    started = time.monotonic()
    daemon: subprocess.Popen | None = None
    hub = DevHub(root / "hub").start()
    try:
        os.environ["HF_ENDPOINT"] = hub.url
        api = HfApi(endpoint=hub.url, token=TOKEN)
        _say(f"1. Local Hub running at {hub.url} (repos under {root / 'hub'})")

        built = time.monotonic()
        real = {
            BASE: realmodel.base_model(real_cache),
            CODE: realmodel.fine_tune("code", real_cache),
            LICENSES: realmodel.fine_tune("licenses", real_cache),
        }
        upstream = {repo: _shard(path, root / "upstream" / repo) for repo, path in real.items()}
        for repo, path in upstream.items():
            api.create_repo(repo, exist_ok=True)
            api.upload_folder(repo_id=repo, folder_path=path, commit_message="initial upload")
        shards = len(list(upstream[BASE].glob("*.safetensors")))
        size = sum(p.stat().st_size for p in upstream[BASE].glob("*.safetensors")) / 1e6
        _say(
            f"2. Pushed SmolLM2-135M-Instruct as {BASE} and two short real fine-tunes, {CODE} and {LICENSES} "
            f"({size:.0f} MB each in {shards} shards; model from {real_cache / 'real'}, {time.monotonic() - built:.0f} s)"
        )

        config = root / "mergebot.toml"
        state_dir = root / "state"
        config.write_text(_config(state_dir))
        _say(f"3. Config with a TIES target merging both fine-tunes onto the base: {config}")
        log_path = root / "daemon.log"
        with log_path.open("w") as log_file:
            daemon = subprocess.Popen(
                [sys.executable, "-m", "mergebot.cli", "run", "--config", str(config)],
                stdout=log_file,
                stderr=log_file,
            )
        _say(f"4. Daemon started (pid {daemon.pid}, log {log_path}); waiting for the first merge")
        watch = _Watch(state_dir, daemon, log_path)
        hub.reset_stats()
        first = watch.next_run(1, "merge, validate, publish", ("published",))
        first_bytes = hub.stats()["bytes_served_total"]
        _describe(first)
        published = Path(snapshot_download(MERGED, revision=first.published_sha, endpoint=hub.url, token=TOKEN))
        answer = realmodel.chat_answer(published, QUESTION)
        _say(f"   asked the published merge {QUESTION!r}: {answer!r}")

        shard = _middle_shard(upstream[CODE])
        _retouch(upstream[CODE] / shard)
        hub.reset_stats()
        update = api.upload_folder(repo_id=CODE, folder_path=upstream[CODE], commit_message="retouch layers 12-17").oid
        _say(f"5. Pushed a new revision of {CODE} ({update[:12]}) that changes only {shard}")
        second = watch.next_run(2, "re-merge what the changed shard feeds", ("published",))
        second_served = hub.stats()
        _describe(second)
        total = len(second.details["computed"]) + len(second.details["reused"])
        if not 0 < len(second.details["computed"]) < total:
            raise DemoError(f"the update recomputed {len(second.details['computed'])} of {total} shards, not a part")

        broken = realmodel.broken_copy(upstream[CODE], root / "upstream" / f"{CODE}-broken")
        hub.reset_stats()
        bad = api.upload_folder(repo_id=CODE, folder_path=broken, commit_message="broken conversion").oid
        _say(f"6. Pushed a broken revision of {CODE} ({bad[:12]}): layer 15's down_proj x{realmodel.BROKEN_FACTOR:.0f}")
        third = watch.next_run(3, "check the broken input", ("held", "failed"))
        _describe(third)
        status = collect_status(load_daemon_config(config))["targets"][TARGET]
        head = api.model_info(MERGED).sha
        if status["published_sha"] != second.published_sha or head != second.published_sha:
            raise DemoError(
                f"{MERGED} moved to {head} after the broken input; it should stay at {second.published_sha}"
            )
        if CODE not in (third.reason or ""):
            raise DemoError(f"the refusal does not name the broken input {CODE}: {third.reason}")

        _say("\nSummary")
        _say(f"  published {MERGED} at {first.published_sha[:12]}; asked {QUESTION!r} it answers {answer!r}")
        _say(
            f"  update of {shard}: recomputed {len(second.details['computed'])} of {total} output shards "
            f"({', '.join(second.details['computed'])}), reused {len(second.details['reused'])}; downloaded "
            f"{_downloads(second_served)} (first merge: {first_bytes / 1e6:.0f} MB); published {second.published_sha[:12]}"
        )
        _say(f"  broken revision {bad[:12]}: {third.outcome}; `mergebot status` says: {status['waiting']}")
        _say(f"  {MERGED} still at {head[:12]} on the Hub")
        _say(f"  finished in {time.monotonic() - started:.0f} s")
        return 0
    finally:
        stop_process(daemon, 30)
        hub.stop()
        if keep:
            _say(f"  kept {root}: mergebot.toml, daemon.log, state/, hub/ (browse: mergebot devhub --root {root}/hub)")
        else:
            shutil.rmtree(root, ignore_errors=True)


def _downloads(stats: dict) -> str:
    files = [
        f"{repo} {path}" for repo, paths in stats["bytes_served"].items() for path in paths if ".safetensors" in path
    ]
    return f"{stats['bytes_served_total'] / 1e6:.1f} MB ({'; '.join(files) or 'no weights'})"


def _describe(run) -> None:
    details = run.details or {}
    parents = ", ".join(f"{name} {ppl:,.1f}" for name, ppl in (details.get("parent_ppl") or {}).items() if ppl)
    sha = f" {run.published_sha[:12]}" if run.published_sha else ""
    _say(
        f"   {TARGET}: {run.outcome}{sha} · shards computed {len(details.get('computed', []))}, reused "
        f"{len(details.get('reused', []))} · perplexity {details.get('merge_ppl') or 0:,.1f} (parents: {parents})"
    )
