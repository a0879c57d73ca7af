"""The seams between the daemon and its merge child, with real processes on the local Hub: the child merges the
revisions the daemon resolved, a crash in the child is an internal error that is retried, and a publish whose record
was lost (kill -9 between the Hub commit and the state record) is recognised and announced on restart."""

from pathlib import Path

import pytest
from huggingface_hub import hf_hub_download

from mergebot.daemon.state import State
from mergebot.pause import PAUSE_DIR
from tests.test_daemon import TOKEN, Setup, published_runs, target, wait_for


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


def oldest_run(setup: Setup, name: str):
    with State.open(setup.root / "state", readonly=True) as state:
        return state.runs(name)[-1]


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
