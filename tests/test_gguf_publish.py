"""Publishing GGUF files against the local Hub: in the merge's own commit, listed on its card; a GGUF file mergebot
named that a later revision does not have (held back, or no longer asked for) is deleted in that revision's commit,
and no other; a sibling repo gets them in a commit of its own whose card names the merge revision."""

from pathlib import Path

from huggingface_hub import hf_hub_download

from mergebot.hub.client import HubClient
from mergebot.pipeline.publish import publish, publish_gguf_repo
from mergebot.runrecord import GgufResult
from tests.test_publish import TOKEN, gate, hub, merge_files, merged, merged_config  # noqa: F401 (fixtures)


def result(name: str, *, passed: bool = True, reason: str | None = None) -> GgufResult:
    return GgufResult(file=name, repo="me/merged", size=2_500_000, sha256="", perplexity=41.5, stop_rate=0.0,
                      passed=passed, reason=reason, published=passed, reused=False)  # fmt: skip


def test_gguf_files_go_in_the_merges_commit_and_a_held_back_one_is_deleted_there(hub, merged, tmp_path, devhub):  # noqa: F811
    made = tmp_path / "gguf" / "merged-Q8_0.gguf"
    made.parent.mkdir()
    made.write_bytes(b"GGUF" + bytes(range(256)) * 100)
    client = HubClient()
    first = publish(
        merged, "me/merged", client, gate(merged, tmp_path), merged_config(merged),
        gguf={"Q8_0": result("merged-Q8_0.gguf")}, gguf_files={"merged-Q8_0.gguf": made},
    )  # fmt: skip
    assert "merged-Q8_0.gguf" in first.uploaded and "model.safetensors.index.json" in first.uploaded
    card = Path(hf_hub_download("me/merged", "README.md", endpoint=devhub.url, token=TOKEN, cache_dir=tmp_path / "d"))
    text = card.read_text(encoding="utf-8")
    assert "| `merged-Q8_0.gguf` | Q8_0 | 2.5 MB | 41.500 | 0% of the probe prompts | yes |" in text
    hub.upload_file(path_or_fileobj=b"theirs", path_in_repo="notes.gguf", repo_id="me/merged")

    failed = {"Q8_0": result("merged-Q8_0.gguf", passed=False, reason="perplexity 3.1x the merge's")}
    second = publish(merged, "me/merged", client, gate(merged, tmp_path), merged_config(merged), gguf=failed)
    assert second.deleted == ["merged-Q8_0.gguf"], "a revision never holds a GGUF file of another merge"
    assert "notes.gguf" in merge_files(hub, "me/merged"), "a GGUF file mergebot did not name is left alone"
    card = Path(hf_hub_download("me/merged", "README.md", endpoint=devhub.url, token=TOKEN, cache_dir=tmp_path / "e"))
    assert "| no: perplexity 3.1x the merge's |" in card.read_text(encoding="utf-8")


def test_a_sibling_repo_gets_the_files_in_a_commit_of_its_own(hub, merged, tmp_path, devhub):  # noqa: F811
    made = tmp_path / "merged-BF16.gguf"
    made.write_bytes(b"GGUF" + bytes(1000))
    client = HubClient()
    main = publish(merged, "me/merged", client, gate(merged, tmp_path), merged_config(merged))
    results = {"BF16": result("merged-BF16.gguf") | {"repo": "me/merged-GGUF"}}
    sibling = publish_gguf_repo(
        "me/merged-GGUF", client, {"merged-BF16.gguf": made}, results, merged_config(merged), "me/merged", main.commit
    )
    assert set(sibling.uploaded) == {"merged-BF16.gguf", "README.md"}
    assert merge_files(hub, "me/merged-GGUF") == {"merged-BF16.gguf", "README.md"}
    card = hf_hub_download("me/merged-GGUF", "README.md", endpoint=devhub.url, token=TOKEN, cache_dir=tmp_path / "d")
    text = Path(card).read_text(encoding="utf-8")
    assert f"at revision `{main.commit}`" in text and "in `me/merged-GGUF`" in text
    again = publish_gguf_repo(
        "me/merged-GGUF", client, {"merged-BF16.gguf": made}, results, merged_config(merged), "me/merged", main.commit
    )
    assert again.uploaded == [] and again.commit == sibling.commit, "nothing changed: no commit"
