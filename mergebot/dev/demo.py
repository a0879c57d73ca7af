"""`mergebot demo`: the main job end to end with a real model on an embedded local Hub, offline.

SmolLM2-135M-Instruct and two short real fine-tunes of it (mergebot.dev.realmodel, built once per machine in the
user's cache) are pushed to a local Hub in shards; the real daemon merges them, validates and publishes, and the
published merge is asked a question. Then one fine-tune gets an update that changes one shard, and the daemon
re-merges only the output shard it feeds; then a broken revision of that fine-tune is pushed, and the daemon holds
the target at its published revision and says which input is to blame. Any other outcome fails the demo.
"""

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from mergebot.daemon.children import stop_process
from mergebot.daemon.runs import RUNNING, Run
from mergebot.daemon.state import STATE_FILE, State
from mergebot.errors import MergebotError
from mergebot.files import INDEX_FILE, SINGLE_FILE, default_cache_dir
from mergebot.runrecord import Outcome

if TYPE_CHECKING:
    from huggingface_hub import HfApi

TIMEOUT = 300.0
SHARD_BYTES = 45_000_000
"""Input and output shards (out_shard_size): about six of SmolLM2's 30 layers each."""
QUESTION = "What is the capital of France?"
RETOUCH = 1.01
"""The update scales one shard's tensors by this: a small real change, harmless to the model."""
TOKEN = "demo-token"
BASE, CODE, LICENSES = "demo/smollm2", "demo/smollm2-code", "demo/smollm2-licenses"
TARGET, MERGED = "smollm2-linear", "demo/smollm2-linear"
PHASES = {"inputs resolved": "inputs resolved", "merged": "merged", "step": "validating"}
"""The events of the merge child that the demo shows as the run's progress (from the daemon's JSON log)."""


class DemoError(MergebotError):
    """An outcome the demo expects did not happen (the CLI prints it and exits non-zero)."""


def _say(message: str) -> None:
    print(message, flush=True)


class _Steps:
    """The demo's numbered steps: each says what it does as it starts and how long it took when it ends, so a slow
    machine shows where the time goes."""

    def __init__(self) -> None:
        self.number = 0

    @contextlib.contextmanager
    def __call__(self, what: str) -> Iterator[None]:
        self.number += 1
        started = time.monotonic()
        _say(f"{self.number}. {what}")
        yield
        _say(f"   done in {time.monotonic() - started:.0f} s")


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
merge_method = "linear"
models = [
  {{ model = "{BASE}", parameters = {{ weight = 0.4 }} }},
  {{ model = "{CODE}", parameters = {{ weight = 0.3 }} }},
  {{ model = "{LICENSES}", parameters = {{ weight = 0.3 }} }},
]
out_shard_size = {SHARD_BYTES}
"""


class _Watch:
    """Follows the daemon's runs of the target by reading its state, as `mergebot status` does, and says what the
    run is doing from the JSON lines its child writes to the daemon's log."""

    def __init__(self, state_dir: Path, daemon: subprocess.Popen, log_path: Path) -> None:
        self.state_dir, self.daemon, self.log_path = state_dir, daemon, log_path
        self.error: MergebotError | None = None
        self._read = 0

    def _finished_runs(self) -> list[Run]:
        if not (self.state_dir / STATE_FILE).exists():
            return []
        try:
            with State.open(self.state_dir, readonly=True) as state:
                return [run for run in state.runs(TARGET) if run.outcome != RUNNING]
        except MergebotError as error:  # not readable yet (the daemon is still creating it): look again
            self.error = error
            return []

    def _phases(self) -> Iterator[str]:
        """What the target's run reported since the last look: one short line per phase or validation step."""
        with self.log_path.open("rb") as log:
            log.seek(self._read)
            text = log.read()
        complete = text[: text.rfind(b"\n") + 1]
        self._read += len(complete)
        for line in complete.decode(errors="replace").splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if not isinstance(event, dict) or event.get("target") != TARGET or event.get("event") not in PHASES:
                continue
            phase = PHASES[event["event"]]
            if event["event"] == "merged":
                phase += f": {event.get('computed')} shard(s) computed, {event.get('reused')} reused"
            elif event["event"] == "step":
                phase += f" {event.get('number')}/{event.get('of')}: {event.get('step')}"
            yield phase

    def next_run(self, count: int, label: str, expected: Outcome) -> Run:
        """Wait for the target's `count`-th finished run, saying what it does meanwhile, say what it did, and fail
        the demo unless its outcome is `expected`."""
        started = time.monotonic()
        deadline = started + TIMEOUT
        while len(runs := self._finished_runs()) < count:
            for phase in self._phases():
                _say(f"   {time.monotonic() - started:4.0f} s  {phase}")
            if self.daemon.poll() is not None:
                raise DemoError(f"the daemon exited with code {self.daemon.returncode}; see {self.log_path}")
            if time.monotonic() > deadline:
                seen = f" (reading its state: {self.error})" if self.error else ""
                raise DemoError(f"timed out after {TIMEOUT:.0f} s: {label}{seen}; see {self.log_path}")
            time.sleep(0.2)
        run = runs[0]
        if run.outcome != expected:
            raise DemoError(f"{label}: expected {expected}, the run {run.outcome}: {run.reason}; see {self.log_path}")
        record, figures = run.record, run.record.figures
        parents = ", ".join(f"{name} {_ppl(ppl)}" for name, ppl in figures.get("parent_ppl", {}).items())
        sha = f" {run.published_sha[:12]}" if run.published_sha else ""
        _say(
            f"   {TARGET}: {run.outcome}{sha} · output shards computed {len(record.computed)}, reused "
            f"{len(record.reused)} · perplexity {_ppl(figures.get('merge_ppl'))} (parents: {parents})"
        )
        return run


def _ppl(value: float | None) -> str:
    return "not measured" if value is None else f"{value:,.1f}"


def _layout_order(name: str) -> tuple:
    """Where mergebot's merge plan puts a tensor: embeddings, the decoder layers in order, then the rest."""
    layer = re.match(r"model\.layers\.(\d+)\.(.+)", name)
    if layer:
        return (1, int(layer[1]), layer[2])
    return (0 if "embed" in name else 2, 0, name)


def _shard(src: Path, dst: Path) -> Path:
    """`src` (one model.safetensors) rewritten in SHARD_BYTES shards with an index, as large models are uploaded,
    packed like the merge's output (same order, same size), so each input shard feeds exactly one output shard.
    Tied embeddings stay tied: no lm_head is added."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(src / SINGLE_FILE, framework="pt") as reader:
        tensors = {name: reader.get_tensor(name) for name in sorted(reader.keys(), key=_layout_order)}
    groups: list[list[str]] = []
    size = 0
    for name, tensor in tensors.items():
        if not groups or size + tensor.nbytes > SHARD_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += tensor.nbytes
    dst.mkdir(parents=True)
    weight_map: dict[str, str] = {}
    for number, names in enumerate(groups, 1):
        file = f"model-{number:05d}-of-{len(groups):05d}.safetensors"
        save_file({name: tensors[name] for name in names}, dst / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, file))
    total = sum(tensor.nbytes for tensor in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (dst / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    for file in src.iterdir():
        if file.is_file() and file.name != SINGLE_FILE:
            shutil.copyfile(file, dst / file.name)
    return dst


def _middle_shard(model_dir: Path) -> str:
    """The shard holding the middle layer: the one the update retouches and `realmodel.broken_copy` breaks."""
    layers = json.loads((model_dir / "config.json").read_text())["num_hidden_layers"]
    weight_map = json.loads((model_dir / INDEX_FILE).read_text())["weight_map"]
    return weight_map[f"model.layers.{layers // 2}.mlp.down_proj.weight"]


def _retouch(shard: Path) -> None:
    """The update: every tensor of one shard scaled by RETOUCH, in place."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(shard)
    save_file({name: tensor * RETOUCH for name, tensor in tensors.items()}, shard, metadata={"format": "pt"})


def _push_inputs(api: "HfApi", real_cache: Path, upstream: Path) -> dict[str, Path]:
    """The real base and its two fine-tunes, sharded under `upstream` and pushed to the Hub: repo -> its folder."""
    from mergebot.dev import realmodel

    def building(what: str) -> None:
        _say(f"   {what}")

    real = {
        BASE: realmodel.base_model(real_cache, building),
        CODE: realmodel.fine_tune("code", real_cache, building),
        LICENSES: realmodel.fine_tune("licenses", real_cache, building),
    }
    folders = {repo: _shard(path, upstream / repo) for repo, path in real.items()}
    for repo, folder in folders.items():
        api.create_repo(repo, exist_ok=True)
        api.upload_folder(repo_id=repo, folder_path=folder, commit_message="initial upload")
    weights = list(folders[BASE].glob("*.safetensors"))
    _say(
        f"   {BASE}, {CODE} and {LICENSES}: {sum(p.stat().st_size for p in weights) / 1e6:.0f} MB each in "
        f"{len(weights)} shards (the model is cached in {real_cache / 'real'})"
    )
    return folders


def run_demo(keep: bool) -> int:
    """The demo, in a temp dir (kept with `keep`); 0 when every step went as described, else a DemoError says
    which did not."""
    started = time.monotonic()
    real_cache = default_cache_dir()  # the user's cache: the real model is built once per machine, not per demo
    root = Path(tempfile.mkdtemp(prefix="mergebot-demo-"))
    os.environ.update(
        {
            "HF_HOME": str(root / "hf-home"),
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

    daemon: subprocess.Popen | None = None
    step = _Steps()
    hub = DevHub(root / "hub").start()
    try:
        os.environ["HF_ENDPOINT"] = hub.url
        api = HfApi(endpoint=hub.url, token=TOKEN)
        _say(f"Local Hub running at {hub.url} (repos under {root / 'hub'})")
        with step("Pushing SmolLM2-135M-Instruct and two short real fine-tunes of it to the local Hub, in shards"):
            upstream = _push_inputs(api, real_cache, root / "upstream")
        size = sum(p.stat().st_size for p in upstream[BASE].glob("*.safetensors"))

        config = root / "mergebot.toml"
        state_dir = root / "state"
        config.write_text(_config(state_dir))
        log_path = root / "daemon.log"
        with step(f"Starting the daemon on a config with one target, a linear merge of the three: {config}"):
            with log_path.open("w") as log_file:
                daemon = subprocess.Popen(
                    [sys.executable, "-m", "mergebot.cli", "run", "--config", str(config)],
                    stdout=log_file,
                    stderr=log_file,
                )
            _say(f"   pid {daemon.pid}, log {log_path}")
        watch = _Watch(state_dir, daemon, log_path)
        with step("The daemon merges, validates and publishes; then the published merge is asked a question"):
            first = watch.next_run(1, "merge, validate, publish", Outcome.PUBLISHED)
            published = Path(snapshot_download(MERGED, revision=first.published_sha, endpoint=hub.url, token=TOKEN))
            answer = realmodel.chat_answer(published, QUESTION)
            _say(f"   asked {QUESTION!r}, the published merge answers {answer!r}")

        shard = _middle_shard(upstream[CODE])
        with step(f"Pushing a new revision of {CODE} that changes only {shard}; the daemon re-merges what it feeds"):
            _retouch(upstream[CODE] / shard)
            hub.reset_stats()
            update = api.upload_folder(repo_id=CODE, folder_path=upstream[CODE], commit_message="retouch one shard").oid
            _say(f"   pushed {update[:12]}")
            second = watch.next_run(2, "re-merge what the changed shard feeds", Outcome.PUBLISHED)
        downloaded = hub.stats()["bytes_served"]
        computed, reused = second.record.computed, second.record.reused
        if computed != [shard]:
            raise DemoError(f"the update of {shard} recomputed {computed or 'nothing'}, not just {shard}")

        factor = realmodel.BROKEN_FACTOR
        with step(f"Pushing a broken revision of {CODE} (one down_proj x{factor:.0f}); the daemon must hold"):
            broken = realmodel.broken_copy(upstream[CODE], root / "upstream" / f"{CODE}-broken")
            bad = api.upload_folder(repo_id=CODE, folder_path=broken, commit_message="broken conversion").oid
            _say(f"   pushed {bad[:12]}")
            third = watch.next_run(3, "check the broken revision", Outcome.HELD)
        status = collect_status(load_daemon_config(config))["targets"][TARGET]
        head = api.model_info(MERGED).sha
        if status["state"] != "held" or (status["hold"] or {}).get("culprit") != CODE:
            raise DemoError(f"{TARGET} is not held on {CODE}: {status['state']}, {status['waiting']}")
        if status["published_sha"] != second.published_sha or head != second.published_sha:
            raise DemoError(
                f"{MERGED} is at {head} after the broken revision; it should stay at {second.published_sha}"
            )

        _say("\nSummary")
        _say(f"  published  {MERGED} at {first.published_sha[:12]}; it answers {QUESTION!r} with {answer!r}")
        _say(
            f"  update     {CODE}@{update[:12]} changed {shard}: downloaded {_megabytes(downloaded, '.safetensors')} "
            f"of weights ({size / 1e6:.0f} MB a model), recomputed {len(computed)} of {len(computed) + len(reused)} "
            f"output shards, reused {len(reused)}; published {second.published_sha[:12]}"
        )
        _say(f"  broken     {CODE}@{bad[:12]}: {third.outcome}; mergebot status: {status['waiting']}")
        _say(f"  the Hub    {MERGED} main is still {head[:12]}")
        _say(f"  finished in {time.monotonic() - started:.0f} s")
        return 0
    finally:
        stop_process(daemon, 30)
        hub.stop()
        if keep:  # what is left to explore; the pushed models' sources and the download cache are scratch
            for scratch in ("upstream", "hf-home", "cache"):
                shutil.rmtree(root / scratch, ignore_errors=True)
            _say(f"  kept {root} ({_folder_size(root)}): mergebot.toml, daemon.log, state/, hub/")
            _say(f"  browse it: mergebot devhub --root {root}/hub")
        else:
            shutil.rmtree(root, ignore_errors=True)


def _folder_size(root: Path) -> str:
    """Disk used under `root`, each hard-linked file once."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for path in root.rglob("*"):
        info = path.lstat()
        if path.is_file() and not path.is_symlink() and (info.st_dev, info.st_ino) not in seen:
            seen.add((info.st_dev, info.st_ino))
            total += info.st_blocks * 512
    return f"{total / 1e9:.1f} GB"


def _megabytes(served: dict[str, dict[str, int]], suffix: str) -> str:
    """What the Hub served of the files whose names end with `suffix`, over all repos."""
    total = sum(size for files in served.values() for path, size in files.items() if path.endswith(suffix))
    return f"{total / 1e6:.1f} MB"
