"""`mergebot demo` as CI runs it: the real command in a child process, then its outcomes read back from what it
kept (the daemon's state and the local Hub), not from what it printed about itself."""

from pathlib import Path

from huggingface_hub import HfApi, snapshot_download

from mergebot.daemon.state import State, TargetState
from mergebot.dev import demo, realmodel
from mergebot.dev.devhub import DevHub
from tests.helpers import run_cli_process

pytest_plugins = ["tests.realmodel_fixtures"]


def changed_files(api: HfApi, repo: str, old: str, new: str) -> set[str]:
    """The files whose content differs between two revisions of a repo."""
    before, after = (
        {f.rfilename: f.blob_id for f in api.model_info(repo, revision=rev, files_metadata=True).siblings}
        for rev in (old, new)
    )
    return {name for name in after if before.get(name) != after[name]}


def test_demo_publishes_remerges_one_shard_and_holds_the_broken_input(real_base, real_fine_tunes, tmp_path):
    env = {
        "TMPDIR": str(tmp_path),  # where the demo makes (and, with --keep, leaves) its directory
        "HOME": str(tmp_path / "home"),
        # the machine's real-model cache (entries live in <cache root>/real/): nothing is rebuilt
        "MERGEBOT_CACHE_DIR": str(real_base.parent.parent),
    }
    result = run_cli_process("demo", "--keep", env=env, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    (root,) = tmp_path.glob("mergebot-demo-*")

    with State.open(root / "state", readonly=True) as state:
        held, update, first = state.runs(demo.TARGET)
        status = state.target_status(demo.TARGET)
    assert (first.outcome, update.outcome, held.outcome) == ("published", "published", "held")
    assert status is not None and status.state == TargetState.HELD
    assert demo.CODE in held.reason and held.record.culprit == demo.CODE
    assert "perplexity" in held.reason and update.published_sha[:12] in held.reason

    with DevHub(root / "hub").start() as hub:
        api = HfApi(endpoint=hub.url, token=demo.TOKEN)
        assert api.model_info(demo.MERGED).sha == update.published_sha, "the broken input must not be published"
        merged = snapshot_download(
            demo.MERGED, revision=first.published_sha, endpoint=hub.url, token=demo.TOKEN, cache_dir=tmp_path / "hf"
        )
        changed = changed_files(api, demo.CODE, first.inputs[demo.CODE], update.inputs[demo.CODE])
        broken = changed_files(api, demo.CODE, update.inputs[demo.CODE], held.inputs[demo.CODE])
    assert "Paris" in realmodel.chat_answer(Path(merged), demo.QUESTION)
    assert len(changed) == 1 and changed == broken, (changed, broken)
    # Input and output shards are packed alike, so the one changed input shard feeds one output shard of that name.
    assert update.record.computed == sorted(changed)
    assert len(update.record.reused) == len(first.record.computed) - 1
