"""The seams between the daemon and its merge child, with real processes on the local Hub: the child merges the
revisions the daemon resolved, a crash in the child is an internal error that is retried, and a publish whose record
was lost (kill -9 between the Hub commit and the state record) is recognised and announced on restart."""

import subprocess
from pathlib import Path

import pytest
from huggingface_hub import hf_hub_download

from mergebot.config.daemon import load_daemon_config
from mergebot.daemon.state import State
from mergebot.daemon.status import metrics_text
from mergebot.pause import PAUSE_DIR
from mergebot.runrecord import RUN_TRAILER, Outcome
from tests.test_daemon import TOKEN, Setup, free_port, published_runs, target, wait_for
from tests.test_notify import Receiver, notify_table


@pytest.fixture
def setup(devhub, tmp_path):
    created = Setup(devhub, tmp_path)
    created.pause = tmp_path / "pause"
    created.pause.mkdir()
    created.env[PAUSE_DIR] = str(created.pause)
    yield created
    if created.process and created.process.poll() is None:
        created.process.kill()
        created.process.wait()


def runs(setup: Setup, name: str) -> list:
    """The target's runs, oldest first (none while the state is not there yet)."""
    if not (setup.root / "state" / "state.sqlite3").exists():
        return []
    with State.open(setup.root / "state", readonly=True) as state:
        return state.runs(name)[::-1]


def oldest_run(setup: Setup, name: str):
    return runs(setup, name)[0]


def test_a_push_between_the_daemons_resolve_and_the_childs_start_is_not_merged(setup):
    (setup.pause / "start").touch()
    setup.write_config(target("pinned"), poll="1h")
    resolved = setup.api.model_info("org/ft1").sha
    setup.start()
    wait_for(lambda: (setup.pause / "start.reached").exists(), what="the child to reach its start")
    moved = setup.change_shard("ft1")
    (setup.pause / "start").unlink()
    wait_for(lambda: published_runs(setup, "pinned"), what="the run to be recorded")
    run = oldest_run(setup, "pinned")
    assert run.outcome == "published"
    assert run.inputs["org/ft1"] == resolved, "the daemon's record"
    assert run.record.inputs["org/ft1"] == resolved, "the child's record of what it merged"
    card = hf_hub_download(
        "me/pinned", "README.md", revision=run.published_sha, endpoint=setup.devhub.url, token=TOKEN,
        cache_dir=setup.root / "dl",
    )  # fmt: skip
    text = Path(card).read_text(encoding="utf-8")
    assert resolved in text and moved not in text, "the published card names the revision recorded"
    assert setup.stop() == 0


def test_an_unexpected_exception_in_the_child_is_an_internal_error_retried_with_its_reason(setup):
    (setup.pause / "start.raise").touch()  # the first child to start raises a RuntimeError (once)
    setup.write_config(target("crashy"), poll="1h")
    setup.start()
    wait_for(lambda: published_runs(setup, "crashy"), what="the retried run to publish")
    first, second = runs(setup, "crashy")[:2]
    assert (first.outcome, first.transient) == (Outcome.INTERNAL_ERROR, True), "not a gate refusal: retried"
    assert first.reason == "internal error: RuntimeError: test-only failure at pause point 'start'"
    assert first.record.outcome == Outcome.INTERNAL_ERROR
    assert second.outcome == Outcome.PUBLISHED, "retried with backoff, like a transient failure"
    crashes = [e for e in setup.events() if e.get("event") == "internal error"]
    assert len(crashes) == 1 and "Traceback" in crashes[0]["exception"], "the traceback, logged once"
    retried = [e for e in setup.events() if e.get("event") == "run will be retried"]
    assert retried[0]["reason"] == first.reason
    assert setup.stop() == 0


def test_a_publish_whose_record_was_lost_is_recorded_and_announced_on_restart(setup):
    (setup.pause / "published").touch()  # the child waits right after its Hub commit
    port = free_port()
    receiver = Receiver(port).start()
    setup.write_config(target("lost") + notify_table(port, "/hook"), poll="1h")
    setup.start()
    try:
        wait_for(lambda: (setup.pause / "published.reached").exists(), what="the child's Hub commit")
        setup.process.kill()  # kill -9 between the Hub commit and the state record; the child dies with it
        setup.process.wait()
        child = ["pgrep", "-f", f"run-target --config {setup.config}"]
        wait_for(lambda: subprocess.run(child, capture_output=True).returncode != 0, 10, "the child to die")
        (lost,) = runs(setup, "lost")
        assert lost.outcome == "running" and receiver.requests == []
        commit = setup.api.list_repo_commits("me/lost")[0]
        assert f"{RUN_TRAILER}: {lost.id}" in commit.message.splitlines(), "the commit names its run"

        (setup.pause / "published").unlink()
        setup.start()
        (event,) = wait_for(lambda: receiver.bodies("/hook"), 60, "the published event after the restart")
        assert (event["event"], event["run"], event["revision"]) == ("published", lost.id, commit.commit_id)
        (recovered,) = runs(setup, "lost")
        assert (recovered.outcome, recovered.published_sha) == (Outcome.PUBLISHED, commit.commit_id)
        assert recovered.record.inputs == lost.inputs and recovered.record.digests
        config = load_daemon_config(setup.config)
        with State.open(setup.root / "state", readonly=True) as state:
            assert 'mergebot_runs_total{target="lost",outcome="published"} 1' in metrics_text(config, state)
        assert setup.stop() == 0
        assert len(runs(setup, "lost")) == 1, "up to date after the recovery: no second run"
    finally:
        receiver.stop()
