"""The Hub layer against the local Hub with the real huggingface_hub client: fetch only what changed, retry,
refuse what is unsafe, and merge from repo ids exactly as from local copies."""

import json
import time
from pathlib import Path

import pytest
from huggingface_hub import HfApi
from safetensors.torch import load_file, save_file

from mergebot.config.merge import ModelSpec
from mergebot.dev.synthetic import make_model
from mergebot.errors import HubAuthError, HubError, HubNotFoundError, ModelError, UnsafePathError
from mergebot.hub.cache import clean_cache
from mergebot.hub.client import HubClient, RetryPolicy
from mergebot.pipeline.inputs import open_hub_model
from tests.helpers import run_cli, tree_digest

FAST_RETRY = RetryPolicy(attempts=4, base_delay=0.01, max_delay=0.05)


@pytest.fixture
def hub_env(devhub, monkeypatch, tmp_path):
    """HF_ENDPOINT pointing at the local Hub, a token, and a fresh HF cache for this test."""
    monkeypatch.setenv("HF_ENDPOINT", devhub.url)
    monkeypatch.setenv("HF_TOKEN", "test-token")
    return HubClient(cache_dir=tmp_path / "hf-cache", retry=FAST_RETRY)


def upload(devhub, repo: str, folder: Path, message: str = "upload") -> str:
    api = HfApi(endpoint=devhub.url, token="test-token")
    api.create_repo(repo, exist_ok=True)
    return api.upload_folder(repo_id=repo, folder_path=folder, commit_message=message).oid


def served(devhub, repo: str) -> dict[str, int]:
    return devhub.stats()["bytes_served"].get(repo, {})


@pytest.fixture
def uploaded(devhub, tmp_path, request) -> dict[str, Path]:
    """org/base and org/ft, in repos with Xet storage (as on the Hub) or, with the param False, without."""
    if not getattr(request, "param", True):
        devhub.create_repo("org/base", xet=False)
        devhub.create_repo("org/ft", xet=False)
    base = make_model(tmp_path / "local" / "base", shard_size=60_000)
    ft = make_model(tmp_path / "local" / "ft", base=base, seed=1, shard_size=60_000)
    upload(devhub, "org/base", base)
    upload(devhub, "org/ft", ft)
    return {"base": base, "ft": ft}


def test_merge_from_hub_ids_equals_merge_of_local_copies(hub_env, uploaded, tmp_path):
    local, remote = tmp_path / "local-out", tmp_path / "hub-out"
    common = ("--method", "slerp", "--set", "t=0.3", "--out-shard-size", "40KB")
    assert run_cli("merge", *common, "--base-model", uploaded["base"], uploaded["ft"], local) == 0
    assert run_cli("merge", *common, "--base-model", "org/base", "org/ft", remote) == 0
    local_files, remote_files = tree_digest(local), tree_digest(remote)
    assert local_files.pop("mergebot_config.yml") != remote_files.pop("mergebot_config.yml")  # names differ
    assert local_files == remote_files
    assert (
        "org/ft@" in (remote / "mergebot_config.yml").read_text()
        or "revision:" in (remote / "mergebot_config.yml").read_text()
    )


@pytest.mark.parametrize("uploaded", [True, False], ids=["xet", "lfs"], indirect=True)
def test_new_revision_downloads_only_the_changed_shard(hub_env, uploaded, devhub, tmp_path):
    """Uploaded through Xet or LFS, a file is read through the resolve route, with mergebot's own bounded GET
    (hub/download.py): never through the client's Xet reconstruction, whose cache paths come from the server."""
    client = hub_env
    first = open_hub_model(client, ModelSpec("org/ft"))
    shards = sorted(p.name for p in first.path.glob("model-*.safetensors"))
    assert set(served(devhub, "org/ft")) >= set(shards)
    assert not devhub.stats()["xorb_bytes_served"]
    devhub.reset_stats()
    changed = uploaded["ft"] / shards[1]
    tensors = load_file(changed)
    tensors = {name: tensor * 2 for name, tensor in tensors.items()}
    save_file(tensors, changed, metadata={"format": "pt"})
    new_sha = upload(devhub, "org/ft", uploaded["ft"], "change one shard")
    second = open_hub_model(client, ModelSpec("org/ft"))
    assert second.revision == new_sha != first.revision
    assert served(devhub, "org/ft") == {shards[1]: changed.stat().st_size}


def test_readme_only_revision_downloads_nothing(hub_env, uploaded, devhub, tmp_path):
    out = tmp_path / "out"
    args = ("merge", "--method", "slerp", "--set", "t=0.5", "--base-model", "org/base", "org/ft", out)
    assert run_cli(*args, "--out-shard-size", "40KB") == 0
    before = tree_digest(out)
    devhub.reset_stats()
    devhub.commit_files("org/ft", {"README.md": b"# a new card\n"}, message="docs")
    assert run_cli(*args, "--out-shard-size", "40KB") == 0
    assert devhub.stats()["bytes_served_total"] == 0
    after = tree_digest(out)
    assert after.pop("mergebot_config.yml") != before.pop("mergebot_config.yml")  # pins the new revision
    assert after == before


def test_incremental_remerge_recomputes_only_affected_shards(hub_env, uploaded, devhub, tmp_path, capsys):
    out = tmp_path / "out"
    args = ("merge", "--method", "slerp", "--set", "t=0.5", "--base-model", "org/base", "org/ft", out)
    assert run_cli(*args, "--out-shard-size", "40KB") == 0
    changed = sorted(uploaded["ft"].glob("model-*.safetensors"))[0]
    tensors = load_file(changed)
    save_file({n: t * 3 for n, t in tensors.items()}, changed, metadata={"format": "pt"})
    upload(devhub, "org/ft", uploaded["ft"], "change the first shard")
    capsys.readouterr()
    assert run_cli(*args, "--out-shard-size", "40KB") == 0
    lines = [json.loads(x) for x in capsys.readouterr().err.splitlines() if '"shard"' in x]
    weight_map = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    affected = {weight_map[name] for name in tensors}
    computed = {line["shard"] for line in lines if line["outcome"] == "computed"}
    assert computed == affected
    assert len(computed) < len(lines)


def test_two_server_errors_then_success(hub_env, uploaded, devhub):
    devhub.inject("resolve", "500", times=2, method="GET")
    model = open_hub_model(hub_env, ModelSpec("org/ft"))
    assert model.tensors


def test_rate_limit_waits_for_retry_after(hub_env, uploaded, devhub):
    devhub.inject("repo_info", "429", times=1, retry_after=1)
    started = time.monotonic()
    sha = hub_env.resolve("org/ft")
    assert len(sha) == 40
    assert time.monotonic() - started >= 0.9


def test_permanent_server_error_is_a_clear_error_and_caches_nothing(hub_env, uploaded, devhub):
    devhub.inject("resolve", "500", times=100, method="GET")
    with pytest.raises(HubError, match=r"org/ft.*failed after 4 attempts \(HTTP 500\)"):
        open_hub_model(hub_env, ModelSpec("org/ft"))
    blobs = list((hub_env.cache_dir).rglob("blobs/*"))
    assert all(p.name.endswith(".incomplete") or p.stat().st_size < 1000 for p in blobs)
    assert not list(hub_env.cache_dir.rglob("snapshots/*/*.safetensors"))


def test_dropped_connection_is_retried(hub_env, uploaded, devhub):
    devhub.inject(r"resolve/.*model-00001", "drop", times=1, method="GET")
    model = open_hub_model(hub_env, ModelSpec("org/ft"))
    assert "model.embed_tokens.weight" in model.tensors


@pytest.mark.parametrize("bad_name", ["../evil.safetensors", "/etc/evil.safetensors", "sub\\evil.safetensors"])
def test_unsafe_file_names_refuse_the_repo(hub_env, devhub, bad_name, tmp_path):
    devhub.commit_files("org/evil", {bad_name: b"x" * 64, "config.json": b"{}"})
    with pytest.raises(UnsafePathError, match="refusing unsafe file name"):
        open_hub_model(hub_env, ModelSpec("org/evil"))
    assert devhub.stats()["bytes_served_total"] == 0
    assert not (tmp_path / "evil.safetensors").exists()


def test_pickle_only_repo_is_refused_before_download(hub_env, devhub):
    devhub.commit_files("org/pickled", {"pytorch_model.bin": b"\x80\x04" + b"x" * 100, "config.json": b"{}"})
    with pytest.raises(ModelError, match=r"only pickle weights \(pytorch_model.bin\)"):
        open_hub_model(hub_env, ModelSpec("org/pickled"))
    assert "pytorch_model.bin" not in served(devhub, "org/pickled")


def test_missing_repo_and_revision_and_revoked_token(hub_env, uploaded, devhub):
    with pytest.raises(HubNotFoundError, match="org/nope: not found"):
        hub_env.resolve("org/nope")
    with pytest.raises(HubNotFoundError, match="revision 'no-such-branch' not found"):
        hub_env.resolve("org/ft", "no-such-branch")
    devhub.set_tokens({"another-token"})
    with pytest.raises(HubAuthError, match="org/ft: access denied") as raised:
        hub_env.resolve("org/ft")
    assert "test-token" not in str(raised.value)


def test_cache_clean_keeps_needed_revisions(hub_env, uploaded, devhub):
    old = open_hub_model(hub_env, ModelSpec("org/ft"))
    devhub.commit_files("org/ft", {"README.md": b"new"})
    new = open_hub_model(hub_env, ModelSpec("org/ft"))
    other = open_hub_model(hub_env, ModelSpec("org/base"))
    removed, _ = clean_cache(hub_env.cache_dir, {"org/ft"}, {("org/ft", new.revision)})
    assert removed == 1
    assert not old.path.exists()
    assert new.path.exists() and other.path.exists()
