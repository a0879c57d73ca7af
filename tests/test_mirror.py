"""Upstream repos read through a real third-party Hugging Face mirror, olah (its own venv, `.venv-olah`, offline over
local git-lfs repositories), merges published to the local Hub. olah differs from the Hub where it matters: its
model_info lists names only, it ignores Range and streams without Content-Length, it answers a missing revision or
file with 401 "repo not found" or 500, and it needs the branch named. None of that may change what is downloaded,
merged or published."""

import hashlib
import json
import os
import re
import socket
import subprocess
import time
from pathlib import Path

import pytest
import requests
from huggingface_hub import HfApi, hf_hub_download
from safetensors.torch import load_file, save_file

from mergebot.config.daemon import DaemonSettings, check_daemon_config
from mergebot.config.models import ModelSpec
from mergebot.dev.synthetic import make_model
from mergebot.errors import HubError, HubNotFoundError
from mergebot.hub.client import HubClient, RemoteFile, RetryPolicy
from mergebot.hub.endpoints import publisher, reader
from mergebot.pipeline.inputs import open_hub_model
from tests.helpers import run_cli_process

OLAH = Path(__file__).resolve().parent.parent / ".venv-olah" / "bin" / "olah-cli"
TOKEN = "test-token"
SHAPE = {"layers": 2, "hidden": 32, "intermediate": 64, "heads": 2, "kv_heads": 1, "shard_size": 20_000}
ACCESS = re.compile(r'"GET /(?P<repo>[^/]+/[^/]+)/resolve/[0-9a-f]{40}/(?P<file>[^ ?]+) HTTP/1.1" 200')


class NoRetry(RetryPolicy):
    """Fails the test at the first retry: a missing repo, revision or file must be known at once."""

    def delay(self, attempt: int, retry_after: float | None) -> float:
        raise AssertionError("a missing repo, revision or file was retried")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Mirror:
    """olah serving the git-lfs repositories under `root/mirrors/models/ORG/NAME`; `served` reads its access log."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.repos = root / "mirrors" / "models"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = root / "olah.log"

    def start(self) -> subprocess.Popen:
        config = self.root / "olah.toml"
        config.write_text(
            f'[basic]\nhost = "127.0.0.1"\nport = {self.port}\nrepos-path = "{self.root / "cache"}"\n'
            f'mirrors-path = ["{self.root / "mirrors"}"]\n\n[accessibility]\noffline = true\n'
        )
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with self.log.open("w") as log:
            process = subprocess.Popen([OLAH, "-c", config], cwd=self.root, env=env, stdout=log, stderr=log)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                requests.get(f"{self.url}/api/models/org/none/refs", timeout=2)
                return process
            except requests.ConnectionError:
                if process.poll() is not None:
                    break
                time.sleep(0.2)
        process.kill()
        raise AssertionError(f"olah did not answer on {self.url}: {self.log.read_text()[-2000:]}")

    def add(self, name: str, **model) -> Path:
        """A new repo org/NAME holding a synthetic model, its weights in git-lfs."""
        path = make_model(self.repos / "org" / name, **SHAPE, **model)
        self.git(name, "init", "-q", "-b", "main")
        self.git(name, "lfs", "install", "--local")
        self.git(name, "lfs", "track", "*.safetensors")
        self.commit(name, "upload")
        return path

    def commit(self, name: str, message: str) -> str:
        self.git(name, "add", "-A")
        self.git(name, "-c", "user.name=test", "-c", "user.email=test@example.com", "commit", "-q", "-m", message)
        return self.git(name, "rev-parse", "HEAD")

    def git(self, name: str, *args: str) -> str:
        done = subprocess.run(["git", *args], cwd=self.repos / "org" / name, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    def served(self) -> list[str]:
        """repo/file of every file GET olah answered, in order."""
        return [f"{m['repo']}/{m['file']}" for m in ACCESS.finditer(self.log.read_text())]


@pytest.fixture(scope="module")
def mirror(tmp_path_factory):
    if not OLAH.exists():
        pytest.skip(f"{OLAH} is absent: .ci/run makes .venv-olah (olah from PyPI)")
    started = time.monotonic()
    created = Mirror(tmp_path_factory.mktemp("olah"))
    base = created.add("base")
    created.add("ft", base=base, seed=1)
    process = created.start()
    print(f"olah up with two repos in {time.monotonic() - started:.1f} s")
    yield created
    process.terminate()
    try:
        process.wait(15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def test_reads_go_to_the_mirror_without_the_publish_token(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "publish-token")
    monkeypatch.setenv("MIRROR_TOKEN", "mirror-token")
    same = DaemonSettings(Path("state"), hub_endpoint="https://hub.example")
    mirrored = DaemonSettings(Path("state"), hub_endpoint="https://hub.example", read_endpoint="https://m.example/")
    assert (reader(same).endpoint, reader(same).token) == ("https://hub.example", "publish-token")
    assert (reader(mirrored).endpoint, reader(mirrored).token) == ("https://m.example", False)
    assert (publisher(mirrored).endpoint, publisher(mirrored).token) == ("https://hub.example", "publish-token")
    with_token = DaemonSettings(Path("state"), read_endpoint="https://m.example", read_token_env="MIRROR_TOKEN")
    assert reader(with_token).token == "mirror-token"


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ('read_endpoint = "hf-mirror.com"', "daemon.read_endpoint: must be a URL like 'https://hf-mirror.com'"),
        ('read_token_env = "MY TOKEN"', "daemon.read_token_env: must name the environment variable"),
    ],
)
def test_read_settings_are_checked_with_their_line(tmp_path, setting, message):
    path = tmp_path / "mergebot.toml"
    path.write_text(f'[daemon]\nstate_dir = "state"\n{setting}\n')
    _, problems = check_daemon_config(path)
    assert len(problems) == 1 and str(problems[0]).startswith(f"{path}:3: {message}")


def test_daemon_merges_from_the_mirror_and_publishes_to_the_hub(mirror, devhub, tmp_path):
    config = tmp_path / "mergebot.toml"
    config.write_text(
        f'[daemon]\nstate_dir = "state"\nread_endpoint = "{mirror.url}"\n\n[[targets]]\nname = "m"\n'
        'repo = "me/merged"\nmerge_method = "slerp"\nbase_model = "org/base"\n'
        'models = [{ model = "org/base" }, { model = "org/ft" }]\nparameters = { t = 0.4 }\nout_shard_size = "20KB"\n'
    )
    env = {
        "HF_ENDPOINT": devhub.url,
        "HF_TOKEN": TOKEN,
        "HF_HOME": str(tmp_path / "hf-home"),
        "MERGEBOT_CACHE_DIR": str(tmp_path / "cache"),
    }
    hub = HfApi(endpoint=devhub.url, token=TOKEN)

    def once() -> subprocess.CompletedProcess:
        done = run_cli_process("once", "--config", config, env=env, cwd=tmp_path, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        return done

    def merged_from() -> str:
        download = hf_hub_download("me/merged", "mergebot_config.yml", endpoint=devhub.url, token=TOKEN)
        return Path(download).read_text()

    ft = mirror.repos / "org" / "ft"
    shards = sorted(p.name for p in ft.glob("model-*.safetensors"))
    assert len(shards) >= 3
    seen = len(mirror.served())
    once()
    first = hub.model_info("me/merged").sha
    pinned = merged_from()
    assert mirror.git("ft", "rev-parse", "HEAD") in pinned and mirror.git("base", "rev-parse", "HEAD") in pinned
    served = mirror.served()[seen:]
    weights = sorted(f for f in served if f.endswith(".safetensors"))
    assert weights == sorted([*(f"org/base/{s}" for s in shards), *(f"org/ft/{s}" for s in shards)])

    changed = ft / shards[1]
    save_file({k: v * 1.02 for k, v in load_file(changed).items()}, changed, metadata={"format": "pt"})
    new_ft = mirror.commit("ft", "change one shard")
    seen = len(mirror.served())
    once()
    assert mirror.served()[seen:] == [f"org/ft/{shards[1]}"]
    second = hub.model_info("me/merged").sha
    assert second != first and new_ft in merged_from()

    (ft / "README.md").write_text("# a new card\n")
    mirror.commit("ft", "docs")
    seen = len(mirror.served())
    again = once()
    assert "up to date" in again.stderr
    assert mirror.served()[seen:] == []
    assert hub.model_info("me/merged").sha == second


def test_missing_repo_revision_and_file_are_one_line_errors_at_once(mirror, tmp_path):
    client = HubClient(endpoint=mirror.url, token=False, cache_dir=tmp_path / "hf", retry=NoRetry())
    unknown = "0123456789abcdef0123456789abcdef01234567"
    started = time.monotonic()
    cases = [
        (lambda: client.resolve("org/none"), f"repo org/none: not found on {mirror.url}"),
        (lambda: client.resolve("org/base", "v9"), f"repo org/base: revision 'v9' not found on {mirror.url}"),
        (lambda: client.resolve("org/base", unknown), f"repo org/base: revision '{unknown}' not found"),  # a 500
        (lambda: client.list_files("org/base", unknown), f"repo org/base: revision '{unknown}' not found"),
    ]
    remote = client.list_files("org/base", client.resolve("org/base"))
    remote.files["tokenizer.model"] = RemoteFile("tokenizer.model", 10, None, "0" * 40)
    cases.append((lambda: client.fetch(remote), f"file tokenizer.model not found on {mirror.url}"))
    for call, message in cases:
        with pytest.raises(HubNotFoundError) as raised:
            call()
        assert message in str(raised.value) and "\n" not in str(raised.value)
    assert time.monotonic() - started < 20


def test_a_download_the_mirror_answers_whole_is_checked_against_the_listing(mirror, tmp_path):
    client = HubClient(endpoint=mirror.url, token=False, cache_dir=tmp_path / "hf", retry=NoRetry())
    remote = client.list_files("org/base", client.resolve("org/base"))
    shard = next(f for f in remote.files.values() if f.sha256)
    blobs = tmp_path / "hf" / "models--org--base" / "blobs"
    blobs.mkdir(parents=True)
    (blobs / f"{shard.sha256}.incomplete").write_bytes(b"\0" * (shard.size // 2))  # resumed with Range: ignored
    model = open_hub_model(client, ModelSpec("org/base"))
    assert (model.path / shard.path).resolve() == blobs / shard.sha256
    assert json.loads((model.path / "config.json").read_text())["num_hidden_layers"] == SHAPE["layers"]

    bad = mirror.add("bad", seed=3)
    stored = sorted(p for p in (bad / ".git" / "lfs" / "objects").rglob("*") if p.is_file())[0]
    data = stored.read_bytes()
    other = data[:-8] + bytes(byte ^ 0xFF for byte in data[-8:])  # the last weights' bytes, the header intact
    stored.write_bytes(other)  # the mirror's LFS store no longer holds what its pointer names
    with pytest.raises(HubError, match="is not the file its listing names") as raised:
        open_hub_model(client, ModelSpec("org/bad"))
    assert "\n" not in str(raised.value)
    assert not (tmp_path / "hf" / "models--org--bad" / "blobs" / hashlib.sha256(other).hexdigest()).exists()
