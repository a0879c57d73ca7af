"""The daemon as a real process against the local Hub: watch, re-merge, publish, reload, survive kill -9, stop."""

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from huggingface_hub import HfApi, ModelCard, hf_hub_download
from safetensors.torch import load_file, save_file

from mergebot.daemon.scheduler import Daemon
from mergebot.daemon.state import TargetState
from mergebot.dev.synthetic import make_model
from tests.helpers import run_cli, run_cli_process

TOKEN = "test-token"


def wait_for(predicate, timeout: float = 120.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


class Setup:
    """Upstream models on the local Hub, a config file, and the daemon process."""

    def __init__(self, devhub, root: Path, layers: int = 4, shard_size: int = 60_000) -> None:
        self.devhub = devhub
        self.root = root
        self.api = HfApi(endpoint=devhub.url, token=TOKEN)
        self.local = root / "upstream"
        base = make_model(self.local / "base", layers=layers, shard_size=shard_size)
        make_model(self.local / "ft1", base=base, seed=1, shard_size=shard_size)
        make_model(self.local / "ft2", base=base, seed=2, shard_size=shard_size)
        for name in ("base", "ft1", "ft2"):
            self.push(name)
        self.config = root / "mergebot.toml"
        self.env = {
            **os.environ,
            "HF_ENDPOINT": devhub.url,
            "HF_TOKEN": TOKEN,
            "HF_HOME": str(root / "hf-home"),
            "MERGEBOT_CACHE_DIR": str(root / "cache"),
        }
        self.process: subprocess.Popen | None = None
        self.log_path = root / "daemon.log"

    def push(self, name: str, message: str = "upload") -> str:
        self.api.create_repo(f"org/{name}", exist_ok=True)
        return self.api.upload_folder(repo_id=f"org/{name}", folder_path=self.local / name, commit_message=message).oid

    def change_shard(self, name: str, index: int = 0) -> str:
        shard = sorted((self.local / name).glob("model-*.safetensors"))[index]
        tensors = load_file(shard)
        save_file({k: v * 1.02 for k, v in tensors.items()}, shard, metadata={"format": "pt"})
        return self.push(name, "change one shard")

    def write_config(self, targets: str, poll: str = "1s", daemon: str = "") -> None:
        """`daemon`: more [daemon] settings, such as `endpoints(...)`."""
        self.config.write_text(
            f'[daemon]\nstate_dir = "state"\npoll_interval = "{poll}"\ndebounce = "0s"\nretry_delay = "1s"\n'
            f'stop_grace = "5s"\n{daemon}{targets}'
        )

    def start(self) -> subprocess.Popen:
        handle = self.log_path.open("a")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mergebot.cli", "run", "--config", str(self.config)],
            stdout=handle,
            stderr=handle,
            env=self.env,
            cwd=self.root,
        )
        return self.process

    def stop(self) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(30)

    def events(self) -> list[dict]:
        lines = self.log_path.read_text().splitlines() if self.log_path.exists() else []
        return [json.loads(line) for line in lines if line.startswith("{")]

    def status(self) -> dict:
        result = run_cli_process("status", "--config", self.config, "--json", env=self.env, cwd=self.root)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    def head(self, repo: str) -> str | None:
        """The repo's head once it holds a published merge (a new repo starts with an empty commit)."""
        try:
            info = self.api.model_info(repo)
        except Exception:
            return None
        names = {sibling.rfilename for sibling in info.siblings or []}
        return info.sha if "model.safetensors.index.json" in names else None

    def card(self, repo: str) -> ModelCard:
        path = hf_hub_download(repo, "README.md", endpoint=self.devhub.url, token=TOKEN, cache_dir=self.root / "dl")
        return ModelCard.load(path)


def target(name: str, method: str = "slerp", models: tuple[str, ...] = ("ft1",), extra: str = "") -> str:
    listed = ", ".join(f'{{ model = "org/{m}" }}' for m in ("base", *models))
    parameters = "parameters = { t = 0.4 }" if method == "slerp" else "parameters = { weight = 0.5, density = 0.6 }"
    return (
        f'\n[[targets]]\nname = "{name}"\nrepo = "me/{name}"\nmerge_method = "{method}"\nbase_model = "org/base"\n'
        f'models = [{listed}]\n{parameters}\nout_shard_size = "40KB"\n{extra}'
    )


@pytest.fixture
def setup(devhub, tmp_path):
    created = Setup(devhub, tmp_path)
    yield created
    if created.process and created.process.poll() is None:
        created.process.kill()
        created.process.wait()


def published_runs(setup: Setup, name: str) -> list[dict]:
    return [e for e in setup.events() if e.get("event") == "run finished" and e.get("target") == name]


def test_new_upstream_revision_is_merged_and_published(setup):
    setup.write_config(target("slerpy"))
    setup.start()
    first = wait_for(lambda: setup.head("me/slerpy"), what="first publish")
    devhub_received = setup.devhub.stats()["bytes_received"]
    assert devhub_received.get("me/slerpy")
    new_sha = setup.change_shard("ft1")
    wait_for(lambda: setup.head("me/slerpy") not in (None, first), what="re-publish after the upstream change")
    wait_for(lambda: len(published_runs(setup, "slerpy")) >= 2, what="the second run to be recorded")
    card = setup.card("me/slerpy")
    assert new_sha in card.text
    assert set(card.data.base_model) == {"org/base", "org/ft1"}
    assert {"merge", "mergebot"} <= set(card.data.tags)
    merged = [e for e in setup.events() if e.get("event") == "merged"]
    assert merged[-1]["computed"] < merged[-1]["computed"] + merged[-1]["reused"]
    snapshots = setup.root / "hf-home" / "hub" / "models--org--ft1" / "snapshots"
    assert [p.name for p in snapshots.iterdir()] == [new_sha], "the replaced revision leaves the cache"
    status = setup.status()["targets"]["slerpy"]
    assert status["inputs"]["org/ft1"] == new_sha
    assert status["last_run"]["outcome"] == "published"
    assert status["shards"] == merged[-1]["computed"] + merged[-1]["reused"]
    assert setup.stop() == 0


def test_readme_only_change_runs_nothing(setup):
    setup.write_config(target("slerpy"))
    setup.start()
    head = wait_for(lambda: setup.head("me/slerpy"), what="first publish")
    wait_for(lambda: published_runs(setup, "slerpy"), what="run record")
    setup.devhub.reset_stats()
    setup.devhub.commit_files("org/ft1", {"README.md": b"# only the card changed\n"})
    wait_for(
        lambda: any(
            e.get("event") == "new upstream revision" and e.get("repo") == "org/ft1" for e in setup.events()[3:]
        ),
        what="the new revision to be seen",
    )
    time.sleep(2.5)
    runs = [e for e in setup.events() if e.get("event") == "run started"]
    assert len(runs) == 1
    assert setup.head("me/slerpy") == head
    assert setup.devhub.stats()["bytes_received"] == {}
    assert setup.stop() == 0


def test_kill_9_during_merge_resumes_and_publishes_the_same_bytes(devhub, tmp_path):
    setup = Setup(devhub, tmp_path, layers=12, shard_size=400_000)
    setup.write_config(target("big", method="ties", models=("ft1", "ft2")).replace('"40KB"', '"20KB"'))
    setup.start()
    work = tmp_path / "state" / "targets" / "big" / ".merged.partial"
    wait_for(lambda: len(list(work.glob("model-*.safetensors"))) >= 2, what="some finished shards")
    setup.process.send_signal(signal.SIGKILL)
    setup.process.wait()
    finished = {p.name: p.stat().st_ino for p in work.glob("model-*.safetensors")}
    child = ["pgrep", "-f", f"run-target --config {setup.config}"]
    wait_for(lambda: subprocess.run(child, capture_output=True).returncode != 0, 10, "the child to die with its daemon")
    assert setup.head("me/big") is None
    setup.start()
    wait_for(lambda: published_runs(setup, "big"), timeout=120, what="publish after restart")
    shards = [e for e in setup.events() if e.get("event") == "shard"]
    resumed = {e["shard"] for e in shards if e["outcome"] == "resumed"}
    assert set(finished) <= resumed
    assert setup.status()["targets"]["big"]["last_run"]["outcome"] == "published"
    setup.stop()
    # An uninterrupted merge of the same inputs, published files compared byte for byte.
    reference = tmp_path / "reference"
    config = tmp_path / "reference.toml"
    config.write_text(
        setup.config.read_text().split("[[targets]]", 1)[1].replace('name = "big"\nrepo = "me/big"\n', "")
    )
    os.environ["HF_ENDPOINT"] = devhub.url
    try:
        assert run_cli("merge", config, reference) == 0
    finally:
        del os.environ["HF_ENDPOINT"]
    remote = {f.rfilename: f.lfs.sha256 for f in setup.api.model_info("me/big", files_metadata=True).siblings if f.lfs}
    local = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in reference.glob("*.safetensors")}
    assert remote == local


def test_config_edits_are_picked_up_and_a_broken_edit_is_ignored(setup):
    setup.write_config(target("first"))
    setup.start()
    wait_for(lambda: setup.head("me/first"), what="first target published")
    setup.write_config(target("first") + target("second", method="ties", models=("ft1", "ft2")))
    wait_for(lambda: setup.head("me/second"), what="added target published without a restart")
    setup.config.write_text(
        setup.config.read_text() + '\n[[targets]]\nname = "broken"\nrepo = "me/broken"\nwhen = "sometimes"\n'
    )
    rejected = wait_for(
        lambda: [e for e in setup.events() if e.get("event") == "config rejected, keeping the running one"],
        what="the broken edit to be rejected",
    )
    assert "when" in rejected[0]["problem"] and "mergebot.toml:" in rejected[0]["problem"]
    setup.change_shard("ft2")
    wait_for(lambda: len(published_runs(setup, "second")) >= 2, what="old config still running")
    assert setup.process.poll() is None
    assert setup.stop() == 0


def test_a_broken_target_does_not_stop_the_others(setup):
    setup.write_config(target("good") + target("gone", models=("missing",)))
    setup.start()
    wait_for(lambda: setup.head("me/good"), what="good target published")
    status = wait_for(
        lambda: (s := setup.status()["targets"]["gone"])["waiting"] != "never checked" and s, what="gone status"
    )
    assert "org/missing" in status["waiting"] and "not found" in status["waiting"]
    setup.devhub.set_tokens({"another-token"})
    wait_for(
        lambda: "access denied" in (setup.status()["targets"]["good"]["waiting"] or ""), what="revoked token reported"
    )
    setup.devhub.set_tokens(None)
    assert setup.process.poll() is None
    assert setup.stop() == 0


def test_second_daemon_refused_and_sigterm_exits_quickly(setup):
    setup.write_config(target("one"), poll="1h")
    setup.start()
    wait_for(lambda: any(e.get("event") == "daemon started" for e in setup.events()), what="start")
    second = run_cli_process("run", "--config", setup.config, env=setup.env, cwd=setup.root, timeout=60)
    assert second.returncode == 2
    assert "another mergebot daemon holds" in second.stderr
    started = time.monotonic()
    assert setup.stop() == 0
    assert time.monotonic() - started < 10


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def endpoints(webhook_port: int, metrics_port: int) -> str:
    """[daemon] settings for the metrics endpoint and the webhook receiver (its secret: MERGEBOT_WEBHOOK_SECRET)."""
    return f'metrics_listen = "127.0.0.1:{metrics_port}"\n[daemon.webhook]\nlisten = "127.0.0.1:{webhook_port}"\n'


def update_payload(repo: str) -> dict:
    """What the Hub posts to a webhook when `repo`'s content changed."""
    return {"event": {"action": "update", "scope": "repo.content"}, "repo": {"name": repo}}


def test_webhook_notify_socket_and_metrics(devhub, tmp_path):
    setup = Setup(devhub, tmp_path)
    port, metrics_port = free_port(), free_port()
    setup.write_config(target("hooked"), poll="1h", daemon=endpoints(port, metrics_port))
    notify_path = tmp_path / "notify.sock"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    notify.settimeout(30)
    setup.env.update({"MERGEBOT_WEBHOOK_SECRET": "s3cret", "NOTIFY_SOCKET": str(notify_path)})
    try:
        setup.start()
        assert notify.recv(4096).startswith(b"READY=1")
        first = wait_for(lambda: setup.head("me/hooked"), what="first publish")
        url = f"http://127.0.0.1:{port}/"
        payload = update_payload("org/ft1")
        assert requests.post(url, json=payload, headers={"X-Webhook-Secret": "wrong"}, timeout=5).status_code == 401
        rejects = wait_for(lambda: [e for e in setup.events() if e.get("event") == "webhook requests rejected"])
        assert (rejects[0]["reason"], rejects[0]["count"]) == ("bad secret", 1)
        setup.change_shard("ft1")
        assert requests.post(url, json=payload, headers={"X-Webhook-Secret": "s3cret"}, timeout=5).status_code == 202
        wait_for(lambda: setup.head("me/hooked") != first, what="webhook-triggered re-merge (poll is 1h)")
        wait_for(lambda: len(published_runs(setup, "hooked")) >= 2, what="the second run to be recorded")
        metrics = requests.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text
        assert 'mergebot_runs_total{target="hooked",outcome="published"} 2' in metrics
        assert 'mergebot_last_success_timestamp_seconds{target="hooked"}' in metrics
        assert setup.stop() == 0
    finally:
        notify.close()


def test_once_runs_due_targets_and_check_config_names_lines(setup):
    setup.write_config(target("cron"))
    result = run_cli_process("once", "--config", setup.config, env=setup.env, cwd=setup.root, timeout=300)
    assert result.returncode == 0, result.stderr
    assert setup.head("me/cron")
    again = run_cli_process("once", "--config", setup.config, env=setup.env, cwd=setup.root, timeout=300)
    assert again.returncode == 0 and "up to date" in again.stderr
    snapshots = setup.root / "hf-home" / "hub" / "models--org--ft1" / "snapshots"
    stale = snapshots / ("0" * 40)
    shutil.copytree(next(snapshots.iterdir()), stale, symlinks=True)
    cleaned = run_cli_process("cache-clean", "--config", setup.config, env=setup.env, cwd=setup.root)
    assert cleaned.returncode == 0 and "removed 1 cached revision" in cleaned.stdout
    assert not stale.exists() and len(list(snapshots.iterdir())) == 1
    setup.config.write_text(
        setup.config.read_text() + '\n[[targets]]\nname = "x"\nrepo = "bad"\nmerge_method = "slerp"\n'
    )
    check = run_cli_process("check-config", "--config", setup.config, env=setup.env)
    assert check.returncode == 2
    line = next(n for n, text in enumerate(setup.config.read_text().splitlines(), 1) if text == 'repo = "bad"')
    assert f"mergebot.toml:{line}: targets[1].repo" in check.stderr


def test_sigterm_while_a_poll_retries_an_unreachable_hub_stops_cleanly(setup):
    setup.env["HF_ENDPOINT"] = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    setup.write_config(target("offline"), poll="1h")
    setup.start()
    wait_for(lambda: any(e.get("event") == "hub retry" for e in setup.events()), what="the poll to retry")
    started = time.monotonic()
    assert setup.stop() == 0
    assert time.monotonic() - started < 5 + 3, "longer than stop_grace and a few seconds"
    log = setup.log_path.read_text()
    assert "Traceback" not in log and "closed database" not in log, log


def test_once_records_a_broken_target_and_runs_the_others(setup):
    setup.write_config(target("gone", models=("missing",)) + target("good"))
    result = run_cli_process("once", "--config", setup.config, env=setup.env, cwd=setup.root, timeout=300)
    assert result.returncode == 1, result.stderr
    assert setup.head("me/good")
    status = setup.status()["targets"]
    assert "org/missing" in status["gone"]["waiting"] and "not found" in status["gone"]["waiting"]
    assert status["gone"]["state"] == "check_failed"
    assert (status["good"]["last_run"]["outcome"], status["good"]["state"]) == ("published", "up_to_date")


def test_the_nightly_window_runs_what_the_state_column_says(tmp_path):
    """The window decides on the recorded state, never on the wording of the message beside it."""
    config = tmp_path / "mergebot.toml"
    nightly = 'when = "nightly"\n'
    config.write_text(
        '[daemon]\nstate_dir = "state"\n' + target("due", extra=nightly) + target("failed", extra=nightly)
    )
    daemon = Daemon(config)
    try:
        daemon.state.set_target_status("due", TargetState.DUE, "a message worded some other way", None)
        daemon.state.set_target_status("failed", TargetState.WAITING_FOR_CHANGE, "due (reads like due); failed", None)
        daemon.nightly()
        assert daemon.scheduler.get_job("run:due") is not None
        assert daemon.scheduler.get_job("run:failed") is None
    finally:
        daemon.state.close()
        daemon.lock.close()


NATIVE_LIBRARIES_OF_MERGING = ("/torch/", "/tokenizers/", "/safetensors/")
"""What torch, and transformers' tokenizers and safetensors, map into a process (transformers is pure Python and
loads these when used)."""


def native_libraries(pid: int) -> set[str]:
    """The shared objects the process has mapped."""
    lines = Path(f"/proc/{pid}/maps").read_text().splitlines()
    return {line.split()[-1] for line in lines if ".so" in line}


def test_the_daemon_process_never_loads_torch(setup):
    control = subprocess.Popen(
        [sys.executable, "-c", "import torch, sys; print(flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        control.stdout.readline()
        assert any("/torch/" in path for path in native_libraries(control.pid)), "the check cannot see torch"
    finally:
        control.kill()
        control.wait()
    setup.write_config(target("light"))
    setup.start()
    wait_for(lambda: published_runs(setup, "light"), what="a run merged in a child and recorded")
    loaded = native_libraries(setup.process.pid)
    assert not [path for path in loaded if any(part in path for part in NATIVE_LIBRARIES_OF_MERGING)]
    assert any("sqlite" in path for path in loaded)
    assert setup.stop() == 0


def test_a_local_input_reruns_only_when_a_file_the_merge_reads_changes(setup):
    local = setup.local / "ft2"
    setup.write_config(target("mixed").replace('{ model = "org/ft1" }', f'{{ model = "{local}" }}'))
    setup.start()
    wait_for(lambda: published_runs(setup, "mixed"), what="first publish")
    (local / "README.md").write_text("# notes that no merge reads\n")
    time.sleep(3)  # three polls
    shard = sorted(local.glob("model-*.safetensors"))[-1]
    save_file({k: v * 1.02 for k, v in load_file(shard).items()}, shard, metadata={"format": "pt"})
    wait_for(lambda: len(published_runs(setup, "mixed")) >= 2, what="a re-merge after the shard changed")
    time.sleep(2)
    assert len([e for e in setup.events() if e.get("event") == "run started"]) == 2
    assert setup.stop() == 0
