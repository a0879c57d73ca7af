"""Publishing against the local Hub: a complete, described revision; nothing for a broken merge; atomic."""

import os
import re
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, ModelCard, hf_hub_download, snapshot_download
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM

from mergebot.config.daemon import ValidateSettings
from mergebot.config.merge import MergeConfig, load_merge_config
from mergebot.dev.synthetic import make_model
from mergebot.errors import HubError, PublishError
from mergebot.files import local_identity
from mergebot.hub.client import HubClient, RetryPolicy
from mergebot.merge.engine import MERGE_CONFIG_FILE
from mergebot.pipeline.gate import validate
from mergebot.pipeline.parents import Parent, SignatureCache
from mergebot.pipeline.publish import publish
from mergebot.pipeline.report import ValidationReport
from tests.helpers import run_cli

TOKEN = "test-token"
EVAL = Path(__file__).resolve().parents[1] / "config" / "eval.txt"
SETTINGS = ValidateSettings(eval_text=EVAL)


@pytest.fixture
def hub(devhub, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_ENDPOINT", devhub.url)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    return HfApi(endpoint=devhub.url, token=TOKEN)


@pytest.fixture
def merged(tmp_path) -> Path:
    base = make_model(tmp_path / "base", shard_size=60_000)
    ft = make_model(tmp_path / "ft", base=base, seed=1, shard_size=60_000)
    out = tmp_path / "merged"
    args = ("--method", "slerp", "--base-model", base, ft, "--set", "t=0.5", out, "--out-shard-size", "40KB")
    assert run_cli("merge", *args) == 0
    return out


def parents(*paths: Path) -> dict[str, Parent]:
    return {path.name: Parent(path, local_identity(path)) for path in paths}


def gate(out: Path, tmp_path: Path) -> ValidationReport:
    return validate(
        out,
        settings=SETTINGS,
        parents=parents(tmp_path / "base", tmp_path / "ft"),
        cache=SignatureCache(tmp_path / "signatures"),
    )


def merged_config(out: Path) -> MergeConfig:
    """What `mergebot merge` recorded in OUT_DIR, as the pipeline hands it to publish."""
    return load_merge_config(out / MERGE_CONFIG_FILE)


def merge_files(api: HfApi, repo: str) -> set[str]:
    return {s.rfilename for s in api.model_info(repo).siblings or []} - {".gitattributes"}


def test_publish_then_download_loads_and_card_tells_lineage(hub, merged, tmp_path, devhub):
    assert run_cli("publish", merged, "--repo", "me/merged", "--eval-text", EVAL) == 0
    snapshot = Path(snapshot_download("me/merged", endpoint=devhub.url, token=TOKEN, cache_dir=tmp_path / "dl"))
    model = LlamaForCausalLM.from_pretrained(snapshot)
    assert torch.isfinite(model(torch.tensor([[1, 7, 9]])).logits).all()
    card = ModelCard.load(snapshot / "README.md")
    assert set(card.data.base_model) == {str(tmp_path / "base"), str(tmp_path / "ft")}
    assert {"merge", "mergebot"} <= set(card.data.tags)
    assert card.data.library_name == "transformers"
    assert "slerp" in card.text and "| this merge |" in card.text and "KL from it" in card.text
    for path in (tmp_path / "base", tmp_path / "ft"):  # each parent's row: perplexity, KL, probe (no template here)
        row = rf"^\| {re.escape(str(path))} \| \d+\.\d{{3}} \| \d\.\d{{4}} \| not probed \|  \|$"
        assert re.search(row, card.text, re.MULTILINE)
    assert "merge_method: slerp" in card.text
    for name in ("config.json", "generation_config.json", "tokenizer.json", "model.safetensors.index.json"):
        assert (snapshot / name).exists()
    commit = hub.list_repo_commits("me/merged")[0]
    assert "slerp merge of" in commit.title
    assert TOKEN not in card.text


def test_card_and_commit_name_each_hub_parent_at_the_sha_merged(hub, tmp_path, devhub):
    base = make_model(tmp_path / "base")
    shas = {}
    for repo, path in (("org/base", base), ("org/ft", make_model(tmp_path / "ft", base=base, seed=1))):
        hub.create_repo(repo)
        shas[repo] = hub.upload_folder(repo_id=repo, folder_path=path, commit_message="upload").oid
    out = tmp_path / "merged"
    assert run_cli("merge", "--method", "slerp", "--base-model", "org/base", "org/ft", "--set", "t=0.5", out) == 0
    devhub.commit_files("org/ft", {"README.md": b"# moved on\n"})  # main moves; the card names what was merged
    assert run_cli("publish", out, "--repo", "me/merged", "--eval-text", EVAL) == 0
    card = ModelCard.load(
        hf_hub_download("me/merged", "README.md", endpoint=devhub.url, token=TOKEN, cache_dir=tmp_path / "dl")
    )
    assert card.data.base_model == ["org/base", "org/ft"]
    for repo, sha in shas.items():
        assert f"| {repo} | `{sha}` |" in card.text
    parents = f"org/base@{shas['org/base'][:12]}, org/ft@{shas['org/ft'][:12]}"
    assert hub.list_repo_commits("me/merged")[0].title == f"mergebot: slerp merge of {parents}"


def test_second_publish_uploads_only_the_changed_shard(hub, merged, tmp_path, devhub):
    client = HubClient()
    first = publish(merged, "me/merged", client, gate(merged, tmp_path), merged_config(merged))
    assert len(first.uploaded) > 3
    shard = sorted(merged.glob("model-*.safetensors"))[2]
    tensors = load_file(shard)
    save_file({k: v * 1.01 for k, v in tensors.items()}, shard, metadata={"format": "pt"})
    devhub.reset_stats()
    second = publish(merged, "me/merged", client, gate(merged, tmp_path), merged_config(merged))
    uploaded_shards = [name for name in second.uploaded if name.endswith(".safetensors")]
    assert uploaded_shards == [shard.name]
    received = devhub.stats()["bytes_received"].get("me/merged", {})
    weights = {path: size for path, size in received.items() if path.endswith(".safetensors")}
    assert weights == {shard.name: shard.stat().st_size}
    third = publish(merged, "me/merged", client, gate(merged, tmp_path), merged_config(merged))
    assert third.uploaded == [] and third.commit == second.commit


def test_nan_upstream_fails_validation_and_publishes_nothing(hub, tmp_path):
    base = make_model(tmp_path / "base")
    ft = make_model(tmp_path / "ft", base=base, seed=1)
    tensors = load_file(ft / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file(tensors, ft / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "merged"
    assert run_cli("merge", "--method", "linear", f"{base}:0.5", f"{ft}:0.5", out) == 0
    assert run_cli("validate", out, "--eval-text", EVAL) == 1
    assert run_cli("publish", out, "--repo", "me/broken", "--eval-text", EVAL) == 2
    assert not hub.repo_exists("me/broken") or not merge_files(hub, "me/broken")
    report = validate(out, settings=SETTINGS, parents=parents(base, ft))
    assert list(report.suspects) == ["ft"] and "parents" in {c.name for c in report.failed_checks}
    with pytest.raises(PublishError, match="validation failed"):
        publish(out, "me/broken", HubClient(), report, merged_config(out))


@pytest.mark.parametrize("upload_route", ["xorb_upload", "shard_upload"])
def test_interrupted_upload_leaves_previous_revision(hub, merged, tmp_path, devhub, upload_route):
    client = HubClient(retry=RetryPolicy(attempts=2, base_delay=0.01, max_delay=0.02))
    report, config = gate(merged, tmp_path), merged_config(merged)
    first = publish(merged, "me/merged", client, report, config)
    shard = sorted(merged.glob("model-*.safetensors"))[0]
    tensors = load_file(shard)
    save_file({k: v * 2 for k, v in tensors.items()}, shard, metadata={"format": "pt"})
    devhub.inject(upload_route, "500", times=100)  # Xet storage fails for good: hf_xet and mergebot give up
    with pytest.raises(HubError):
        publish(merged, "me/merged", client, gate(merged, tmp_path), config)
    assert hub.model_info("me/merged").sha == first.commit
    devhub.clear_faults()
    devhub.inject("commit", "500", times=100)
    with pytest.raises(HubError):
        publish(merged, "me/merged", client, gate(merged, tmp_path), config)
    assert hub.model_info("me/merged").sha == first.commit
    devhub.clear_faults()
    retried = publish(merged, "me/merged", client, gate(merged, tmp_path), config)
    assert retried.commit != first.commit
    assert hub.model_info("me/merged").sha == retried.commit


def test_private_repo_is_created_private(hub, merged, tmp_path):
    publish(merged, "me/private", HubClient(), gate(merged, tmp_path), merged_config(merged), private=True)
    assert hub.model_info("me/private").private is True
    assert os.environ["HF_TOKEN"] == TOKEN
