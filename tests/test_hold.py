"""Holding a target whose input or merge regressed since its last publish, and releasing it: the state's migration
and release requests on real SQLite files, the daemon's decisions in-process, and the whole loop with the real
daemon, its merge children and the local Hub."""

import json
import shutil
import sqlite3
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import requests
import torch
from safetensors.torch import load_file, save_file

from mergebot.daemon.scheduler import Daemon
from mergebot.daemon.schema import SCHEMA_VERSION
from mergebot.daemon.state import STATE_FILE, State, TargetState
from mergebot.errors import ExitCode, StateError
from mergebot.runrecord import Outcome, RunRecord
from tests import test_daemon
from tests.helpers import run_cli_process
from tests.test_daemon import Setup, endpoints, free_port, published_runs, target, update_payload, wait_for
from tests.test_state import V2_SCHEMA, make_v1, user_version

setup = test_daemon.setup
"""The fixture of the daemon tests: upstream models on the local Hub, a config file and the daemon process."""

# --- the migration ------------------------------------------------------------------------------------------------

# What version 3 added, and runs of every outcome that release knew, with a gap at the end of the ids (run 5 was
# deleted by hand): the rebuilt table must keep the rows and the counter.
V3_STEPS = """
ALTER TABLE target_status ADD COLUMN state TEXT NOT NULL DEFAULT 'up_to_date';
INSERT INTO runs VALUES (2, 't', 'cfg', 1100.0, 1110.0, 'failed', 'perplexity 9 above 7', 0, NULL, '{"x": 1}');
INSERT INTO runs VALUES (3, 't', 'cfg', 1200.0, 1201.0, 'interrupted', 'daemon stopped', 1, NULL, NULL);
INSERT INTO runs VALUES (4, 'u', 'cfg', 1300.0, NULL, 'running', NULL, 0, NULL, NULL);
INSERT INTO runs VALUES (5, 'u', 'cfg', 1400.0, 1401.0, 'unchanged', NULL, 0, 'p1', NULL);
INSERT INTO run_inputs VALUES (2, 'org/a', 'a2');
INSERT INTO run_inputs VALUES (4, '/models/b', 'local:b1');
DELETE FROM runs WHERE id = 5;
PRAGMA user_version = 3;
"""


def make_v3(path: Path) -> None:
    make_v1(path)
    db = sqlite3.connect(path)
    db.executescript(V2_SCHEMA + V3_STEPS)
    db.close()


def dump(path: Path) -> tuple[list, list]:
    db = sqlite3.connect(path)
    try:
        runs = db.execute("SELECT * FROM runs ORDER BY id").fetchall()
        return runs, db.execute("SELECT * FROM run_inputs ORDER BY run_id, source").fetchall()
    finally:
        db.close()


def test_version_3_file_keeps_every_run_and_admits_held(tmp_path):
    path = tmp_path / STATE_FILE
    make_v3(path)
    before = dump(path)
    assert len(before[0]) == 4 and len(before[1]) == 3
    with State(path) as s:
        assert user_version(path) == SCHEMA_VERSION
        assert dump(path) == before
        assert s.start_run("t", "cfg", {"org/a": "a3"}) == 6  # id 5 was given out once: never again
        s.finish_run(6, RunRecord(Outcome.HELD, "org/a@a3: perplexity 7.0 → 900.0 since the last publish"))
        assert (s.last_run("t").outcome, s.last_successful_run("t").id) == ("held", 1)
    db = sqlite3.connect(path)
    try:
        db.execute("PRAGMA foreign_keys = ON")
        assert [row[2] for row in db.execute("PRAGMA foreign_key_list(run_inputs)")] == ["runs"]
        assert db.execute("PRAGMA foreign_key_check").fetchall() == []
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        with pytest.raises(sqlite3.IntegrityError, match="CHECK"):
            db.execute("INSERT INTO runs (target, config_hash, started, outcome) VALUES ('t', 'c', 1, 'paused')")
        with pytest.raises(sqlite3.IntegrityError, match="FOREIGN KEY"):
            db.execute("INSERT INTO run_inputs VALUES (99, 'org/a', 'a1')")
        names = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
        assert {"runs", "run_inputs", "runs_by_target", "releases"} <= names
        assert not {"runs_v4", "run_inputs_v4"} & names
    finally:
        db.close()


def test_a_failed_rebuild_leaves_the_version_3_file_as_it_was(tmp_path):
    path = tmp_path / STATE_FILE
    make_v3(path)
    before = dump(path)
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE releases (x)")  # makes the last step of migration 4 fail
    db.close()
    with pytest.raises(StateError, match="releases already exists"):
        State(path)
    assert user_version(path) == 3 and dump(path) == before
    db = sqlite3.connect(path)
    try:
        with pytest.raises(sqlite3.IntegrityError, match="CHECK"):  # the old constraint, on the old table
            db.execute("INSERT INTO runs (target, config_hash, started, outcome) VALUES ('t', 'c', 1, 'held')")
        assert not {"runs_v4", "run_inputs_v4"} & {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
    finally:
        db.close()


# --- release requests -----------------------------------------------------------------------------------------


def held(state: State, target: str, inputs: dict[str, str] | None = None) -> int:
    """Record a held run of `target`, as the daemon does, and return its id."""
    run_id = state.start_run(target, "cfg", inputs or {"org/a": "a2"})
    with state.transaction():
        state.finish_run(run_id, RunRecord(Outcome.HELD, "org/a@a2: worse", culprit="org/a"))
        state.set_target_status(target, TargetState.HELD, "org/a@a2: worse", None)
    return run_id


def test_release_requests(tmp_path):
    with State.open(tmp_path) as s:
        assert s.request_release("t") is None  # never ran
        published = s.start_run("t", "cfg", {"org/a": "a1"})
        s.finish_run(published, RunRecord(Outcome.PUBLISHED, published_sha="p1"))
        assert s.request_release("t") is None  # nothing holds it
        hold = held(s, "t")
        assert s.releases() == set()
        assert s.request_release("t").id == hold
        assert s.request_release("t").id == hold  # asking twice is one release
        assert s.releases() == {"t"}
        with State.open(tmp_path, readonly=True) as reader:  # what the daemon and the child see
            assert reader.releases() == {"t"}
        s.clear_release("t")
        assert s.releases() == set()

        held(s, "u")
        s.set_target_status("u", TargetState.UP_TO_DATE, None, None)  # its inputs went back to the published ones
        assert s.request_release("u") is None
        held(s, "v")
        s.start_run("v", "cfg", {"org/a": "a3"})  # a run started meanwhile: the hold is over
        assert s.request_release("v") is None
        assert s.releases() == set()


# --- the daemon's decisions, in-process ---------------------------------------------------------------------------

DIGESTS = {"org/base": "d-base", "org/ft1": "d-ft1"}


@pytest.fixture
def daemon(tmp_path):
    config = tmp_path / "mergebot.toml"
    config.write_text('[daemon]\nstate_dir = "state"\ndebounce = "1h"\n' + target("t"))
    created = Daemon(config)
    run_id = created.state.start_run("t", created.config.targets["t"].config_hash, {"org/ft1": "a1"})
    created.state.finish_run(run_id, RunRecord(Outcome.PUBLISHED, published_sha="p1", digests=DIGESTS))
    yield created
    created.state.close()
    created.lock.close()


def hold_run(daemon: Daemon, digests: dict[str, str]) -> None:
    """A run of "t" that its child held, recorded by the daemon."""
    run_id = daemon.state.start_run("t", daemon.config.targets["t"].config_hash, {"org/ft1": "a2"})
    result = RunRecord(Outcome.HELD, "org/ft1@a2: worse since the last publish", culprit="org/ft1", digests=digests)
    daemon._record(daemon.config.targets["t"], run_id, ExitCode.HELD, result)


def test_a_held_target_waits_until_a_release_or_new_content(daemon):
    bad = DIGESTS | {"org/ft1": "d-bad"}
    hold_run(daemon, bad)
    t = daemon.config.targets["t"]
    status = daemon.state.target_status("t")
    assert (status.state, status.waiting_reason) == (TargetState.HELD, "org/ft1@a2: worse since the last publish")
    assert daemon.state.last_run("t").record.culprit == "org/ft1"

    daemon._consider(t, bad, 1234.0)  # polls find the same content: it stays held, nothing runs
    daemon._watch_releases()
    assert daemon.state.target_status("t").state == TargetState.HELD
    assert daemon.scheduler.get_job("run:t") is None

    assert daemon.state.request_release("t") is not None
    daemon._consider(t, bad, 1234.0)
    assert daemon.scheduler.get_job("run:t") is None  # a poll leaves a release to the watch job
    daemon._watch_releases()
    job = daemon.scheduler.get_job("run:t")
    assert job is not None and job.args == ("t",)
    assert daemon.state.target_status("t").state == TargetState.DUE  # at once, not after the 1h debounce
    daemon.scheduler.remove_job("run:t")

    # the release run fails on a transient error: the release stays for its retry
    run_id = daemon.state.start_run("t", t.config_hash, {"org/ft1": "a2"})
    daemon._record(t, run_id, ExitCode.RETRY_LATER, RunRecord(reason="Hub 503", digests=bad))
    assert daemon.state.releases() == {"t"}
    # the retry fails the gate: it ended for good, so the release is used up, and new inputs are compared again
    run_id = daemon.state.start_run("t", t.config_hash, {"org/ft1": "a2"})
    daemon._record(t, run_id, ExitCode.VALIDATION_FAILED, RunRecord(reason="validation failed", digests=bad))
    assert daemon.state.releases() == set()
    assert daemon.state.target_status("t").state == TargetState.WAITING_FOR_CHANGE


def test_new_content_runs_a_held_target_with_the_comparison(daemon):
    hold_run(daemon, DIGESTS | {"org/ft1": "d-bad"})
    daemon._consider(daemon.config.targets["t"], DIGESTS | {"org/ft1": "d-good"}, 1234.0)
    assert daemon.scheduler.get_job("run:t") is not None
    status = daemon.state.target_status("t")
    assert status.state == TargetState.DUE and "new upstream content in org/ft1" in status.waiting_reason
    assert daemon.state.releases() == set()


# --- the whole loop: the real daemon, its children and the local Hub ----------------------------------------------

LOOSE_GATE = "validate = { max_parent_ratio = 1e9, max_ppl_ratio = 1e9, max_kl = 1e9, max_weight_outlier = 1e9 }\n"
"""The gate's own limits opened wide, so that what decides is the comparison with the last publish (kept at its
defaults): a released run of the regressed input then passes and publishes."""
BROKEN_SCALE = 30.0
"""lm_head × 30 raises a synthetic fine-tune's perplexity from ~526 to ~7.2 million (measured: × 10 gives ~2,100,
× 100 ~9e21); any input jump above max_input_jump (1.5) holds."""


def variant(setup: Setup, name: str, label: str, change: Callable[[str, torch.Tensor], torch.Tensor]) -> Path:
    """A copy of upstream model `name` with `change(tensor_name, tensor)` applied to every tensor."""
    out = setup.root / "variants" / label
    shutil.copytree(setup.local / name, out)
    for shard in out.glob("model-*.safetensors"):
        tensors = load_file(shard)
        save_file({k: change(k, v) for k, v in tensors.items()}, shard, metadata={"format": "pt"})
    return out


def push(setup: Setup, repo: str, folder: Path, message: str) -> str:
    return setup.api.upload_folder(repo_id=repo, folder_path=folder, commit_message=message).oid


def broken_ft1(setup: Setup) -> str:
    """Push a revision of org/ft1 whose lm_head is scaled up; its sha."""
    folder = variant(setup, "ft1", "broken", lambda name, t: t * BROKEN_SCALE if name == "lm_head.weight" else t)
    return push(setup, "org/ft1", folder, "a broken upload")


def good_ft1(setup: Setup) -> str:
    """Push a revision of org/ft1 with a small change to one shard that does not hold lm_head; its sha."""
    shards = [set(load_file(shard)) for shard in sorted((setup.local / "ft1").glob("model-*.safetensors"))]
    first = next(names for names in shards if "lm_head.weight" not in names)
    folder = variant(setup, "ft1", "good", lambda name, t: t * 1.01 if name in first else t)
    return push(setup, "org/ft1", folder, "a small fix")


def logged(setup: Setup, event: str, name: str) -> list[dict]:
    return [e for e in setup.events() if e.get("event") == event and e.get("target") == name]


def release(setup: Setup, name: str) -> subprocess.CompletedProcess:
    return run_cli_process("release", name, "--config", setup.config, env=setup.env, cwd=setup.root)


def test_a_broken_input_holds_the_target_until_a_person_releases_it(setup):
    webhook, metrics = free_port(), free_port()
    setup.env["MERGEBOT_WEBHOOK_SECRET"] = "s3cret"
    # No poll between start and the end of the test: the webhook tells of new revisions, and a release must be
    # acted on by the daemon by itself.
    setup.write_config(target("guarded", extra=LOOSE_GATE), poll="1h", daemon=endpoints(webhook, metrics))
    setup.start()
    published = wait_for(lambda: setup.head("me/guarded"), what="first publish")

    def notify_ft1() -> None:
        hook = requests.post(
            f"http://127.0.0.1:{webhook}/", json=update_payload("org/ft1"), headers={"X-Webhook-Secret": "s3cret"}
        )
        assert hook.status_code == 202

    refused = release(setup, "guarded")
    assert refused.returncode == ExitCode.PERMANENT and "not held" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1

    broken = broken_ft1(setup)
    notify_ft1()
    wait_for(lambda: logged(setup, "run held", "guarded"), what="the run to be held")
    status = setup.status()["targets"]["guarded"]
    assert status["state"] == "held"
    assert status["last_run"]["outcome"] == "held"
    assert status["hold"]["culprit"] == "org/ft1" and status["hold"]["at"] == published
    reason = status["hold"]["reason"]
    assert status["waiting"] == reason
    assert f"org/ft1@{broken[:8]}" in reason and "since the last publish" in reason
    assert f"holding at revision {published[:8]}" in reason
    assert setup.head("me/guarded") == published, "nothing is uploaded while held"
    text = run_cli_process("status", "--config", setup.config, env=setup.env, cwd=setup.root).stdout
    assert f"status {reason}" in text and f"held   at {published[:12]}, blamed on org/ft1" in text
    scraped = requests.get(f"http://127.0.0.1:{metrics}/metrics", timeout=5).text
    assert 'mergebot_holds_total{target="guarded"} 1' in scraped
    assert 'mergebot_runs_total{target="guarded",outcome="held"} 1' in scraped

    notify_ft1()  # the same content again: a held target waits
    wait_for(lambda: len([e for e in setup.events() if e.get("event") == "webhook"]) >= 2, what="the second webhook")
    time.sleep(3)
    assert len(logged(setup, "run started", "guarded")) == 2

    released_at = time.monotonic()
    done = release(setup, "guarded")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("guarded: released; the daemon runs it") and len(done.stdout.splitlines()) == 1
    wait_for(lambda: len(logged(setup, "run started", "guarded")) == 3, what="the released run")
    assert time.monotonic() - released_at < 15, "a release is acted on within seconds, not at the next poll"
    after = wait_for(lambda: (head := setup.head("me/guarded")) != published and head, what="publish after release")
    wait_for(lambda: len(published_runs(setup, "guarded")) == 2, what="the released run to be recorded")
    assert published_runs(setup, "guarded")[-1]["outcome"] == "published"
    status = setup.status()["targets"]["guarded"]
    assert (status["state"], status["hold"], status["published_sha"]) == ("up_to_date", None, after)
    assert status["last_run"]["inputs"]["org/ft1"] == broken
    with State.open(setup.root / "state", readonly=True) as state:
        assert state.releases() == set(), "the publish used the release up"
    again = release(setup, "guarded")
    assert again.returncode == ExitCode.PERMANENT and "not held" in again.stderr
    unknown = release(setup, "nope")
    assert unknown.returncode == ExitCode.PERMANENT and "no target named 'nope'" in unknown.stderr
    assert setup.stop() == 0


def test_a_later_good_revision_ends_the_hold_by_itself(setup):
    setup.write_config(target("guarded", extra=LOOSE_GATE))
    setup.start()
    published = wait_for(lambda: setup.head("me/guarded"), what="first publish")
    broken_ft1(setup)
    wait_for(lambda: logged(setup, "run held", "guarded"), what="the run to be held")
    assert setup.head("me/guarded") == published
    fixed = good_ft1(setup)
    after = wait_for(lambda: (head := setup.head("me/guarded")) != published and head, what="publish of the fix")
    wait_for(lambda: len(published_runs(setup, "guarded")) == 2, what="the fix's run to be recorded")
    status = setup.status()["targets"]["guarded"]
    assert (status["state"], status["hold"], status["published_sha"]) == ("up_to_date", None, after)
    assert status["last_run"]["inputs"]["org/ft1"] == fixed
    with State.open(setup.root / "state", readonly=True) as state:
        assert [run.outcome for run in state.runs("guarded")] == ["published", "held", "published"]
        assert state.releases() == set()
    assert setup.stop() == 0


def test_release_refuses_an_unknown_or_never_run_target(tmp_path):
    config = tmp_path / "mergebot.toml"
    config.write_text('[daemon]\nstate_dir = "state"\n' + target("t"))
    unknown = run_cli_process("release", "x", "--config", config)
    assert unknown.returncode == ExitCode.PERMANENT
    assert unknown.stderr.strip() == f"mergebot: error: {config}: no target named 'x'"
    never = run_cli_process("release", "t", "--config", config)
    assert never.returncode == ExitCode.PERMANENT and "t is not held" in never.stderr
    assert not (tmp_path / "state").exists(), "a refused release writes nothing"


def test_an_input_whose_eos_id_changed_holds_naming_the_field(setup):
    """Weights untouched, only eos_token_id moved to another special token: perplexity cannot see it, the
    comparison of the input's files with those at the last publish does."""
    setup.write_config(target("guarded", extra=LOOSE_GATE))
    setup.start()
    published = wait_for(lambda: setup.head("me/guarded"), what="first publish")
    folder = setup.root / "ft1-eos"
    shutil.copytree(setup.local / "ft1", folder)
    for name in ("config.json", "generation_config.json"):
        config = json.loads((folder / name).read_text())
        config["eos_token_id"] = 0
        (folder / name).write_text(json.dumps(config))
    changed = push(setup, "org/ft1", folder, "eos on another token")
    wait_for(lambda: logged(setup, "run held", "guarded"), what="the run to be held")
    status = setup.status()["targets"]["guarded"]
    assert status["state"] == "held" and status["hold"]["culprit"] == "org/ft1"
    reason = status["hold"]["reason"]
    assert reason.startswith(f"org/ft1@{changed[:12]}: config.eos_token_id 2 </s> → 0 <unk> since the last publish")
    assert setup.head("me/guarded") == published
    assert setup.stop() == 0
