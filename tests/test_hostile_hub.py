"""mergebot against a hostile Hub (the devhub's hostile kinds, real HTTP on loopback, the real client): no value a
server sends becomes a path outside the cache, no body is written past its listed size, no small file is parsed
past its limits, and each refusal is one line naming the repo or file."""

import hashlib
import json
import os
import struct
import time
from pathlib import Path

import pytest
from huggingface_hub import HfApi

from mergebot.config.document import read_document
from mergebot.config.merge import ModelSpec
from mergebot.dev.devhub import DevHub
from mergebot.dev.synthetic import make_model
from mergebot.errors import FileLimitError, HubError, MergebotError
from mergebot.files import JSON_DEPTH_LIMIT, SMALL_FILE_LIMIT
from mergebot.hub.cache import clean_cache
from mergebot.hub.client import HubClient, RetryPolicy
from mergebot.merge.vocab import read_vocab
from mergebot.pipeline.inputs import open_hub_model
from tests.helpers import run_cli_process
from tests.test_daemon import Setup
from tests.test_daemon import target as daemon_target

FAST_RETRY = RetryPolicy(attempts=2, base_delay=0.01, max_delay=0.02)
ESCAPE = "../../../../canary/evil.pth"
"""A server value that, taken as a path under the cache's blobs or refs folder, lands in the canary folder."""


@pytest.fixture
def world(devhub, tmp_path):
    """A fine-tune on the local Hub, a Hub client with its cache under tmp_path/home, and an empty canary folder
    beside it that nothing may write to."""
    model = make_model(tmp_path / "local" / "ft", shard_size=60_000)
    api = HfApi(endpoint=devhub.url, token="test-token")
    api.create_repo("org/ft")
    api.upload_folder(repo_id="org/ft", folder_path=model)
    (tmp_path / "canary").mkdir()
    client = HubClient(endpoint=devhub.url, token="test-token", cache_dir=tmp_path / "home" / "hub", retry=FAST_RETRY)
    return client


def outside(tmp_path: Path, *allowed: str) -> list[Path]:
    """Files under tmp_path that are not under one of the allowed folders (nor the local model or the Hub's store)."""
    allowed_dirs = [tmp_path / name for name in (*allowed, "local", "devhub")]
    return [
        path
        for path in tmp_path.rglob("*")
        if not path.is_dir() and not any(path.is_relative_to(folder) for folder in allowed_dirs)
    ]


def test_bad_etag_is_never_a_path(world, devhub, tmp_path):
    devhub.inject("resolve", "etag", times=100, value=ESCAPE)
    model = open_hub_model(world, ModelSpec("org/ft"))
    assert model.tensors
    assert outside(tmp_path, "home") == []
    assert all(path.resolve().is_relative_to(tmp_path / "home") for path in model.path.iterdir())


def test_bad_commit_sha_is_refused(world, devhub, tmp_path):
    devhub.inject("repo_info", "commit", value=ESCAPE)
    with pytest.raises(HubError, match=r"^repo org/ft@main: the endpoint sent a malformed commit sha") as raised:
        world.resolve("org/ft")
    assert "\n" not in str(raised.value)
    assert outside(tmp_path, "home") == []


def test_bad_commit_header_of_a_download_changes_nothing(world, devhub, tmp_path):
    devhub.inject("resolve", "commit", times=100, value=ESCAPE)
    model = open_hub_model(world, ModelSpec("org/ft"))
    assert model.revision == world.resolve("org/ft")
    assert outside(tmp_path, "home") == []


@pytest.mark.parametrize(("kind", "what"), [("oid", "git blob id"), ("lfs_oid", "LFS sha256")])
def test_bad_listing_ids_are_refused(world, devhub, tmp_path, kind, what):
    devhub.inject("tree", kind, times=100, value=ESCAPE)
    with pytest.raises(HubError, match=f"repo org/ft@.*: the endpoint sent a malformed {what}"):
        open_hub_model(world, ModelSpec("org/ft"))
    assert devhub.stats()["bytes_served_total"] == 0
    assert outside(tmp_path, "home") == []


def test_redirect_to_another_host_gets_no_token(world, devhub, tmp_path):
    """A redirect's Location is only a URL: the file comes from there, checked like any download, and the token
    stays with the endpoint (the other Hub refuses any token but its own, and serves public files without one)."""
    config = (tmp_path / "local" / "ft" / "config.json").read_bytes()
    with DevHub(tmp_path / "other", tokens={"another-token"}).start() as other:
        other.commit_files("org/ft", {"config.json": config})
        devhub.inject(r"resolve/.*config\.json", "redirect", value=f"{other.url}/org/ft/resolve/main/config.json")
        model = open_hub_model(world, ModelSpec("org/ft"))
        assert other.stats()["bytes_served"]["org/ft"]["config.json"] == len(config)
    assert model.config
    assert outside(tmp_path, "home", "other") == []


@pytest.mark.parametrize(
    ("location", "message"),
    [
        ("file:///etc/passwd", "redirected to a non-HTTP location"),
        ("/org/ft/resolve/main/config.json", "more than 5 redirects"),  # to itself
    ],
)
def test_bad_redirects_are_refused(world, devhub, location, message):
    devhub.inject(r"resolve/.*config\.json", "redirect", times=100, value=location)
    with pytest.raises(HubError, match=rf"^repo org/ft@\w+: config.json: {message}"):
        open_hub_model(world, ModelSpec("org/ft"))


@pytest.mark.parametrize("name", ["config.json", "model-00001-of-"])
def test_body_larger_than_listing_stops_at_the_listed_size(world, devhub, tmp_path, name):
    """Every attempt stops at the listed size: nothing bigger than the listed file is ever on disk."""
    devhub.inject(f"resolve/.*{name}", "oversize", times=100, method="GET", extra=64 << 20)
    with pytest.raises(HubError, match=r"repo org/ft@\w+: .*: the endpoint sent more than the listed \d+ bytes"):
        open_hub_model(world, ModelSpec("org/ft"))
    sizes = {path.name: path.stat().st_size for path in (tmp_path / "home").rglob("*") if path.is_file()}
    assert max(sizes.values()) < 1 << 20
    deadline = time.monotonic() + 10  # the server counts a response once its last write fails
    while "org/ft" not in devhub.stats()["bytes_served"] and time.monotonic() < deadline:
        time.sleep(0.05)
    served = sum(devhub.stats()["bytes_served"]["org/ft"].values())
    assert served < 64 << 20  # the client hung up instead of reading the rest
    assert outside(tmp_path, "home") == []


def test_oversized_config_in_listing_is_refused_before_download(world, devhub):
    devhub.commit_files("org/ft", {"config.json": b" " * (SMALL_FILE_LIMIT + 1)})
    with pytest.raises(FileLimitError, match=r"^repo org/ft@\w+: config.json is listed at \d+ bytes, over the"):
        open_hub_model(world, ModelSpec("org/ft"))
    assert devhub.stats()["bytes_served_total"] == 0


def deep(levels: int) -> bytes:
    return b'{"a": ' * levels + b"1" + b"}" * levels


@pytest.mark.parametrize("levels", [100_000, JSON_DEPTH_LIMIT + 1])
def test_deeply_nested_config_is_one_line(world, devhub, levels):
    devhub.commit_files("org/ft", {"config.json": deep(levels)})
    with pytest.raises(FileLimitError, match=f"^model org/ft: .*config.json is nested deeper than {JSON_DEPTH_LIMIT}"):
        open_hub_model(world, ModelSpec("org/ft"))


def test_deeply_nested_tokenizer_is_one_line(world, devhub):
    devhub.commit_files("org/ft", {"tokenizer.json": deep(100_000)})
    model = open_hub_model(world, ModelSpec("org/ft"))
    with pytest.raises(FileLimitError, match=f"org/ft: .*tokenizer.json is nested deeper than {JSON_DEPTH_LIMIT}"):
        read_vocab(model.path, "org/ft")


def test_deeply_nested_safetensors_header_is_one_line(world, devhub):
    header = b'{"x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    shard = min(n for n in HfApi(endpoint=devhub.url).list_repo_files("org/ft") if n.endswith(".safetensors"))
    devhub.commit_files("org/ft", {shard: struct.pack("<Q", len(header)) + header})
    with pytest.raises(FileLimitError, match="safetensors header is nested deeper than"):
        open_hub_model(world, ModelSpec("org/ft"))


def test_cache_clean_never_follows_a_link_out_of_the_cache(world, tmp_path):
    model = open_hub_model(world, ModelSpec("org/ft"))
    victim = tmp_path / "canary" / "victim"
    victim.write_text("keep me")
    planted = model.path.parent / ("0" * 40)
    planted.mkdir()
    (planted / "config.json").symlink_to(victim)
    os.symlink(victim, model.path.parent.parent / "blobs" / "planted")
    removed, _ = clean_cache(world.cache_dir, {"org/ft"}, set())
    assert removed == 2
    assert victim.read_text() == "keep me"


def test_merge_drops_remote_code_and_the_card_says_so(devhub, tmp_path):
    """The whole command against the Hub: upstream auto_map pointers do not reach the published files."""
    base = make_model(tmp_path / "local" / "base")
    ft = make_model(tmp_path / "local" / "ft", base=base, seed=1)
    for model in (base, ft):
        config = json.loads((model / "config.json").read_text())
        (model / "config.json").write_text(json.dumps(config | {"auto_map": {"AutoModel": "evil--x.Model"}}))
        tokenizer = model / "tokenizer_config.json"
        settings = json.loads(tokenizer.read_text()) if tokenizer.exists() else {}
        tokenizer.write_text(json.dumps(settings | {"auto_map": {"AutoTokenizer": ["evil--t.T", None]}}))
    api = HfApi(endpoint=devhub.url, token="test-token")
    for repo, folder in (("org/base", base), ("org/ft", ft)):
        api.create_repo(repo)
        api.upload_folder(repo_id=repo, folder_path=folder)
    env = {"HF_ENDPOINT": devhub.url, "HF_TOKEN": "test-token", "HF_HOME": str(tmp_path / "home")}
    out = tmp_path / "work" / "out"
    merged = run_cli_process("merge", "--method", "linear", "org/base:0.5", "org/ft:0.5", out, env=env)
    assert merged.returncode == 0, merged.stderr
    assert "auto_map" not in (out / "config.json").read_text()
    assert "auto_map" not in (out / "tokenizer_config.json").read_text()
    published = run_cli_process("publish", out, "--repo", "me/merged", "--force", env=env)
    assert published.returncode == 0, published.stderr
    card = api.hf_hub_download("me/merged", "README.md")
    assert "`config.json: auto_map`" in Path(card).read_text()
    assert "`tokenizer_config.json: auto_map`" in Path(card).read_text()


def test_the_command_refuses_a_hostile_download_in_one_line(devhub, tmp_path):
    """The real command, its HF cache under tmp_path/home: a bad ETag writes nothing outside, an oversized body
    ends the command with one line naming the repo and file."""
    model = make_model(tmp_path / "local" / "ft")
    api = HfApi(endpoint=devhub.url, token="test-token")
    api.create_repo("org/ft")
    api.upload_folder(repo_id="org/ft", folder_path=model)
    (tmp_path / "canary").mkdir()
    devhub.inject(r"resolve/.*model\.safetensors", "oversize", times=1000, method="GET", extra=8 << 20)
    devhub.inject("resolve", "etag", times=1000, value=ESCAPE)  # every other download (a request meets one fault)
    env = {"HF_ENDPOINT": devhub.url, "HF_TOKEN": "test-token", "HF_HOME": str(tmp_path / "home")}
    result = run_cli_process("merge", "--method", "linear", "org/ft:1", tmp_path / "work" / "out", env=env)
    assert result.returncode == 3
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and "org/ft" in errors[0] and "model.safetensors" in errors[0], result.stderr
    assert outside(tmp_path, "home", "work") == []


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("deep.yml", "a: " + "[" * 50_000 + "]" * 50_000, "invalid YAML: nested too deeply"),
        ("deep.toml", "a = " + "[" * 50_000 + "]" * 50_000, "invalid TOML: nested too deeply"),
        ("nested.yml", "a: " + "[" * (JSON_DEPTH_LIMIT + 1) + "]" * (JSON_DEPTH_LIMIT + 1), "nested deeper than"),
        ("alias.yml", "r: &r [*r]", "nested deeper than"),
        ("huge.yml", "#" * (SMALL_FILE_LIMIT + 1), "huge.yml is 16777217 bytes, over the 16777216 mergebot reads"),
    ],
)
def test_deep_or_huge_config_file_is_one_line(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(MergebotError, match=message) as raised:
        read_document(path)
    assert "\n" not in str(raised.value) and str(path) in str(raised.value)


def test_a_poisoned_cached_blob_is_not_trusted(world, devhub, tmp_path):
    """Another tool sharing the cache named a blob after what a hostile endpoint said: its bytes are checked once
    before use, and replaced."""
    remote = world.list_files("org/ft", world.resolve("org/ft"))
    shard = next(f for f in remote.files.values() if f.sha256)
    blob = world.cache_dir / "models--org--ft" / "blobs" / shard.sha256
    blob.parent.mkdir(parents=True)
    blob.write_bytes(b"\0" * shard.size)
    model = open_hub_model(world, ModelSpec("org/ft"))
    assert hashlib.sha256((model.path / shard.path).read_bytes()).hexdigest() == shard.sha256


def test_the_daemon_keeps_the_last_good_revision_against_a_hostile_hub(devhub, tmp_path):
    """`once` publishes, then the Hub turns hostile on the next upstream revision: bad ETags on every download and a
    changed shard that runs past its listing. Nothing lands outside the cache, the published revision stays, and
    the reason is one line naming the repo and file."""
    setup = Setup(devhub, tmp_path)
    setup.write_config(daemon_target("t"))
    first = run_cli_process("once", "--config", setup.config, env=setup.env, cwd=tmp_path, timeout=300)
    assert first.returncode == 0, first.stderr
    published = setup.head("me/t")
    (tmp_path / "canary").mkdir()
    setup.change_shard("ft1")
    devhub.inject(r"org/ft1/resolve/.*model-00001", "oversize", times=1000, method="GET", extra=16 << 20)
    devhub.inject("resolve", "etag", times=1000, value=ESCAPE)
    second = run_cli_process("once", "--config", setup.config, env=setup.env, cwd=tmp_path, timeout=300)
    assert second.returncode != 0
    assert setup.head("me/t") == published
    reason = setup.status()["targets"]["t"]["last_run"]["reason"]
    assert "org/ft1" in reason and "model-00001" in reason and "\n" not in reason, reason
    assert list((tmp_path / "canary").iterdir()) == []
    assert not [path for path in tmp_path.rglob("evil.pth*")]
