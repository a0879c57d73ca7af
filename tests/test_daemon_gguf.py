"""GGUF files beside a published merge, end to end with the real daemon on the local Hub: they go out in the merge's
own commit (or right after, to a sibling repo, retried when that commit fails); one the converter or its checks
refuse is held back while the safetensors still publish, and status, the card and the notification say why; a
change of the GGUF settings alone converts without merging; a run that recomputed no shard does not convert."""

import hashlib
from pathlib import Path

import pytest
from huggingface_hub import hf_hub_download

from mergebot.errors import StateError
from mergebot.runrecord import Outcome
from tests.gguf_fixtures import use_bpe
from tests.helpers import run_cli_process
from tests.test_daemon import TOKEN, Setup, free_port, target, wait_for
from tests.test_daemon_runs import runs
from tests.test_notify import Receiver, notify_table

GGUF_TIMEOUT = 240.0
"""A run converts and checks each GGUF file after the gate: more than a plain run on a loaded machine."""


@pytest.fixture
def setup(devhub, tmp_path):
    """The daemon tests' upstream models, each with a byte-level BPE tokenizer llama.cpp can read."""
    created = Setup(devhub, tmp_path)
    for name in ("base", "ft1", "ft2"):
        use_bpe(created.local / name)
        created.push(name, "a byte-level BPE tokenizer")
    yield created
    if created.process and created.process.poll() is None:
        created.process.kill()
        created.process.wait()


@pytest.fixture
def word_level_setup(devhub, tmp_path):
    """The daemon tests' upstream models as they are: a word-level tokenizer, which no GGUF can hold."""
    created = Setup(devhub, tmp_path)
    yield created
    if created.process and created.process.poll() is None:
        created.process.kill()
        created.process.wait()


def finished(setup: Setup, name: str, count: int, timeout: float = GGUF_TIMEOUT) -> list:
    """The target's first `count` runs once they have all ended, oldest first."""

    def ended() -> list | None:
        try:
            done = [run for run in runs(setup, name) if run.outcome != "running"]
        except StateError:  # the daemon has just created the state and not migrated it yet
            return None
        return done if len(done) >= count else None

    return wait_for(ended, timeout, f"run {count} of {name} to end")[:count]


def files_at(setup: Setup, repo: str, revision: str) -> set[str]:
    return set(setup.api.list_repo_files(repo, revision=revision))


def status_text(setup: Setup) -> str:
    result = run_cli_process("status", "--config", setup.config, env=setup.env, cwd=setup.root)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_the_merge_and_its_gguf_files_go_out_in_one_commit(setup):
    setup.write_config(target("g", extra='gguf = ["Q8_0", "F16"]\n'), poll="1h")
    setup.start()
    (run,) = finished(setup, "g", 1)
    assert run.outcome == Outcome.PUBLISHED, run.reason
    results = run.record.gguf
    assert set(results) == {"Q8_0", "F16"}
    for file_type, result in results.items():
        assert (result["passed"], result["published"], result["reused"]) == (True, True, False), result
        assert result["file"] == f"g-{file_type}.gguf" and result["repo"] == "me/g" and result["size"] > 0
    publish, created = setup.api.list_repo_commits("me/g")  # newest first: the publish, the repo's empty commit
    assert publish.commit_id == run.published_sha
    assert {"g-Q8_0.gguf", "g-F16.gguf", "model.safetensors.index.json"} <= files_at(setup, "me/g", publish.commit_id)
    assert not any(name.endswith(".gguf") for name in files_at(setup, "me/g", created.commit_id))
    local = hf_hub_download(
        "me/g", "g-Q8_0.gguf", revision=publish.commit_id, endpoint=setup.devhub.url, token=TOKEN,
        cache_dir=setup.root / "dl",
    )  # fmt: skip
    assert hashlib.sha256(Path(local).read_bytes()).hexdigest() == results["Q8_0"]["sha256"]
    card = setup.card("me/g").text
    assert "## GGUF files" in card and "| `g-Q8_0.gguf` | Q8_0 |" in card and " MB |" in card
    status = status_text(setup)
    assert "  gguf   Q8_0 " in status and "published in me/g" in status
    assert setup.stop() == 0


def test_a_gguf_file_the_converter_refuses_is_held_back_and_the_merge_still_publishes(word_level_setup):
    setup = word_level_setup
    receiver = Receiver(port := free_port()).start()
    try:
        setup.write_config(target("w", extra='gguf = ["Q8_0"]\n') + notify_table(port, "/hook"), poll="1h")
        setup.start()
        (run,) = finished(setup, "w", 1)
        assert run.outcome == Outcome.PUBLISHED, "the safetensors revision still goes out"
        result = run.record.gguf["Q8_0"]
        assert (result["passed"], result["published"]) == (False, False)
        assert "tokenizer" in result["reason"], "it says why: no GGUF tokenizer model holds a word-level one"
        assert not any(name.endswith(".gguf") for name in files_at(setup, "me/w", run.published_sha))
        assert "| `w-Q8_0.gguf` | Q8_0 | n/a |" in setup.card("me/w").text
        assert f"not published: {result['reason']}" in status_text(setup)
        (event,) = wait_for(lambda: receiver.bodies("/hook"), 60, "the published event")
        assert event["gguf"]["Q8_0"]["reason"] == result["reason"]
        assert (setup.root / "state" / "targets" / "w" / "gguf").is_dir(), "made in the work dir, never published"
        assert setup.stop() == 0
    finally:
        receiver.stop()


def test_gguf_settings_alone_convert_without_merging_and_a_run_without_new_shards_does_not_convert(setup):
    setup.write_config(target("i", extra='gguf = ["Q8_0"]\n'), poll="1h")
    setup.start()
    (first,) = finished(setup, "i", 1)
    assert first.outcome == Outcome.PUBLISHED and first.record.computed
    assert setup.stop() == 0

    setup.write_config(target("i", extra='gguf = ["Q8_0"]\nvalidate = { max_kl = 0.45 }\n'), poll="1h")
    setup.start()
    second = finished(setup, "i", 2)[1]
    assert second.record.computed == [], "the same merge: every shard reused"
    assert second.record.gguf["Q8_0"]["reused"] is True, "and its GGUF file not converted again"
    assert second.record.gguf["Q8_0"]["published"] is True and "i-Q8_0.gguf" not in second.record.uploaded
    assert setup.stop() == 0

    setup.write_config(target("i", extra='gguf = ["Q8_0", "F16"]\n'), poll="1h")
    setup.start()
    third = finished(setup, "i", 3)[2]
    assert third.outcome == Outcome.PUBLISHED, third.reason
    assert third.record.computed == [], "a GGUF setting alone does not merge again"
    assert third.record.gguf["Q8_0"]["reused"] is True and third.record.gguf["F16"]["reused"] is False
    assert "i-F16.gguf" in third.record.uploaded and "i-Q8_0.gguf" not in third.record.uploaded
    assert {"i-Q8_0.gguf", "i-F16.gguf"} <= files_at(setup, "me/i", third.published_sha)
    assert setup.stop() == 0


def test_gguf_files_in_a_sibling_repo_go_right_after_and_a_failed_commit_is_retried(setup, devhub):
    devhub.inject(r"/me/s-GGUF/commit/", "500", times=100, method="POST")  # the sibling's commit fails for good
    setup.write_config(target("s", extra='gguf = ["Q8_0"]\ngguf_repo = "me/s-GGUF"\n'), poll="2s")
    setup.start()
    finished(setup, "s", 1)
    devhub.clear_faults()  # the Hub is back before the next run (a child starts, merges and gates first)
    first, second = finished(setup, "s", 2)
    assert first.outcome == Outcome.PUBLISHED and "s-Q8_0.gguf" not in files_at(setup, "me/s", first.published_sha)
    result = first.record.gguf["Q8_0"]
    assert (result["passed"], result["published"]) == (True, False)
    assert result["reason"].startswith("the commit to me/s-GGUF failed: ")
    assert second.record.computed == [] and second.record.gguf["Q8_0"]["reused"] is True
    assert second.record.gguf["Q8_0"]["published"] is True, "the next run retried the GGUF publish"
    (head,) = [c for c in setup.api.list_repo_commits("me/s-GGUF") if "GGUF files of me/s@" in c.title]
    assert "s-Q8_0.gguf" in files_at(setup, "me/s-GGUF", head.commit_id)
    assert first.published_sha[:12] in setup.card("me/s-GGUF").text, "the sibling names the revision it is made from"
    wait_for(lambda: "up to date" in status_text(setup), 60, "the target to be up to date")
    assert setup.stop() == 0
