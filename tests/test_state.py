"""The state database and the daemon lock, on real SQLite files and real processes."""

import math
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from contextlib import closing
from pathlib import Path

import pytest

from mergebot.daemon.lock import LOCK_FILE, acquire_lock
from mergebot.daemon.schema import SCHEMA_VERSION
from mergebot.daemon.state import STATE_FILE, State, TargetState
from mergebot.errors import StateError
from mergebot.runrecord import Outcome, RunRecord

# Version 1 of the schema written out by hand, as a file from the first release would hold it: migrating it must
# keep working even if someone edits the migration list by mistake.
V1_SCHEMA = """
CREATE TABLE revisions (repo TEXT NOT NULL, ref TEXT NOT NULL, sha TEXT NOT NULL, first_seen REAL NOT NULL,
    PRIMARY KEY (repo, ref, sha)) WITHOUT ROWID;
CREATE TABLE refs (repo TEXT NOT NULL, ref TEXT NOT NULL, sha TEXT NOT NULL, seen REAL NOT NULL,
    PRIMARY KEY (repo, ref)) WITHOUT ROWID;
CREATE TABLE runs (id INTEGER PRIMARY KEY AUTOINCREMENT, target TEXT NOT NULL, config_hash TEXT NOT NULL,
    started REAL NOT NULL, finished REAL,
    outcome TEXT NOT NULL DEFAULT 'running'
        CHECK (outcome IN ('running', 'published', 'failed', 'unchanged', 'interrupted')),
    reason TEXT, transient INTEGER NOT NULL DEFAULT 0, published_sha TEXT, details TEXT);
CREATE INDEX runs_by_target ON runs (target, outcome, id);
CREATE TABLE run_inputs (run_id INTEGER NOT NULL REFERENCES runs (id), source TEXT NOT NULL, sha TEXT NOT NULL,
    PRIMARY KEY (run_id, source)) WITHOUT ROWID;
CREATE TABLE shards (target TEXT NOT NULL, name TEXT NOT NULL, fingerprint TEXT NOT NULL, recorded REAL NOT NULL,
    PRIMARY KEY (target, name)) WITHOUT ROWID;
INSERT INTO revisions VALUES ('org/a', 'main', 'a1', 1000.0);
INSERT INTO refs VALUES ('org/a', 'main', 'a1', 1000.0);
INSERT INTO runs VALUES (1, 't', 'cfg', 1000.0, 1010.0, 'published', NULL, 0, 'p1', '{"seconds": 10}');
INSERT INTO run_inputs VALUES (1, 'org/a', 'a1');
INSERT INTO shards VALUES ('t', 'model-00001.safetensors', 'fp1', 1005.0);
PRAGMA user_version = 1;
"""


def make_v1(path: Path) -> None:
    db = sqlite3.connect(path)
    db.executescript(V1_SCHEMA)
    db.close()


def user_version(path: Path) -> int:
    db = sqlite3.connect(path)
    try:
        return db.execute("PRAGMA user_version").fetchone()[0]
    finally:
        db.close()


def tables(path: Path) -> set[str]:
    db = sqlite3.connect(path)
    try:
        return {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    finally:
        db.close()


def start_python(code: str) -> subprocess.Popen[str]:
    """A child Python running `code`; it prints one line when it reached the point the test waits for."""
    process = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert process.stdout is not None
    line = process.stdout.readline().strip()
    if not line:
        process.kill()
        raise AssertionError(f"child failed: {process.communicate()[1]}")
    return process


def kill9(process: subprocess.Popen[str]) -> None:
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert process.returncode == -signal.SIGKILL


@pytest.fixture
def state(tmp_path):
    with State.open(tmp_path / "state") as s:
        yield s


# --- schema and migrations ------------------------------------------------------------------------------------


def test_new_state_dir_is_created_at_current_version_in_wal_mode(tmp_path):
    with State.open(tmp_path / "a" / "b"):
        pass
    path = tmp_path / "a" / "b" / STATE_FILE
    assert user_version(path) == SCHEMA_VERSION
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.close()


def test_empty_file_is_migrated(tmp_path):
    path = tmp_path / STATE_FILE
    path.touch()
    with State(path) as s:
        assert s.record_revision("org/a", "main", "a1")
    assert user_version(path) == SCHEMA_VERSION
    expected = {"revisions", "refs", "runs", "run_inputs", "shards", "target_status", "releases"}
    assert expected <= tables(path)


def test_version_1_file_is_migrated_keeping_its_rows(tmp_path):
    path = tmp_path / STATE_FILE
    make_v1(path)
    with State(path) as s:
        assert user_version(path) == SCHEMA_VERSION
        assert s.latest_revision("org/a", "main") == "a1"
        assert not s.record_revision("org/a", "main", "a1")
        run = s.last_successful_run("t")
        assert run is not None
        assert (run.id, run.published_sha, run.inputs) == (1, "p1", {"org/a": "a1"})
        assert run.record == RunRecord(seconds=10), "a record of version 1 reads"
        assert s.shard_fingerprints("t") == {"model-00001.safetensors": "fp1"}
        # the tables version 2 added work (the one that later moved out is gone)
        s.set_target_status("t", TargetState.WAITING_FOR_WINDOW, "waiting for the nightly window", 2000.0)
        assert s.target_status("t").next_check == 2000.0
        assert s.start_run("t", "cfg", {}) == 2


# What version 2 added, with the status messages the daemon of that release wrote (it had no state column).
V2_SCHEMA = """
CREATE TABLE parent_perplexity (repo TEXT NOT NULL, sha TEXT NOT NULL, eval_hash TEXT NOT NULL, ppl REAL,
    recorded REAL NOT NULL, PRIMARY KEY (repo, sha, eval_hash)) WITHOUT ROWID;
CREATE TABLE target_status (target TEXT PRIMARY KEY, waiting_reason TEXT, next_check REAL, updated REAL NOT NULL)
    WITHOUT ROWID;
INSERT INTO target_status VALUES ('fresh', NULL, 2000.0, 1000.0);
INSERT INTO target_status VALUES ('soon', 'due (never merged); run scheduled', 2000.0, 1000.0);
INSERT INTO target_status VALUES ('night', 'due (new upstream content in org/a); waits for the nightly window '
    || '2026-01-02 03:00:00+00:00', 2000.0, 1000.0);
INSERT INTO target_status VALUES ('flaky', 'retrying in 300 s after: exit code 3', 1300.0, 1000.0);
INSERT INTO target_status VALUES ('tired', 'gave up after 5 retries: exit code 3', NULL, 1000.0);
INSERT INTO target_status VALUES ('gone', 'cannot check inputs: repo org/x: not found', 2000.0, 1000.0);
INSERT INTO target_status VALUES ('bad', 'failed: perplexity 9 above 7; waits for new inputs or a config change',
    NULL, 1000.0);
INSERT INTO target_status VALUES ('stuck', 'last run failed: x; waits for new inputs or a config change', 2000.0,
    1000.0);
PRAGMA user_version = 2;
"""


def test_version_2_status_rows_get_the_state_their_message_meant(tmp_path):
    path = tmp_path / STATE_FILE
    make_v1(path)
    db = sqlite3.connect(path)
    db.executescript(V2_SCHEMA)
    db.close()
    with State(path) as s:
        assert user_version(path) == SCHEMA_VERSION
        names = ("fresh", "soon", "night", "flaky", "tired", "gone", "bad", "stuck")
        assert {name: s.target_status(name).state for name in names} == {
            "fresh": TargetState.UP_TO_DATE,
            "soon": TargetState.DUE,
            "night": TargetState.WAITING_FOR_WINDOW,
            "flaky": TargetState.RETRYING,
            "tired": TargetState.GAVE_UP,
            "gone": TargetState.CHECK_FAILED,
            "bad": TargetState.WAITING_FOR_CHANGE,
            "stuck": TargetState.WAITING_FOR_CHANGE,
        }
        status = s.target_status("flaky")
        assert (status.waiting_reason, status.next_check, status.updated) == (
            "retrying in 300 s after: exit code 3",
            1300.0,
            1000.0,
        )


def test_failed_migration_leaves_the_file_at_its_old_version(tmp_path):
    path = tmp_path / STATE_FILE
    make_v1(path)
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE target_status (x)")  # makes the second step of migration 2 fail
    db.close()
    with pytest.raises(StateError, match="target_status already exists"):
        State(path)
    assert user_version(path) == 1
    assert "parent_perplexity" not in tables(path)  # the first step of migration 2 was rolled back too


def test_newer_schema_is_refused_with_a_clear_message(tmp_path):
    path = tmp_path / STATE_FILE
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()
    for readonly in (False, True):
        with pytest.raises(StateError, match=f"schema version {SCHEMA_VERSION + 1}, newer than this mergebot"):
            State(path, readonly=readonly)
    assert user_version(path) == SCHEMA_VERSION + 1


def test_foreign_files_are_refused(tmp_path):
    other = tmp_path / "other.sqlite3"
    db = sqlite3.connect(other)
    db.execute("CREATE TABLE notes (x)")
    db.close()
    with pytest.raises(StateError, match="not a mergebot state database"):
        State(other)
    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"not sqlite at all, but long enough to have a header" * 10)
    with pytest.raises(StateError, match=str(garbage)):
        State(garbage)


# --- read-only access -----------------------------------------------------------------------------------------


def test_readonly_needs_a_migrated_file_and_refuses_writes(tmp_path):
    with pytest.raises(StateError, match="no mergebot state"):
        State.open(tmp_path / "none", readonly=True)
    old = tmp_path / "old" / STATE_FILE
    old.parent.mkdir()
    make_v1(old)
    with pytest.raises(StateError, match="start the daemon once to migrate"):
        State(old, readonly=True)
    assert user_version(old) == 1

    with State.open(tmp_path / "s") as writer:
        writer.record_revision("org/a", "main", "a1")
    with State.open(tmp_path / "s", readonly=True) as reader:
        assert reader.latest_revision("org/a", "main") == "a1"
        with pytest.raises(StateError, match="read-only"):
            reader.record_revision("org/a", "main", "a2")


def test_reader_is_not_blocked_by_an_open_write_transaction(tmp_path):
    with State.open(tmp_path) as writer, State.open(tmp_path, readonly=True) as reader:
        writer.record_revision("org/a", "main", "a1")
        with writer.transaction():
            writer.record_revision("org/a", "main", "a2")
            started = time.monotonic()
            assert reader.latest_revision("org/a", "main") == "a1"  # the last committed state, at once
            assert time.monotonic() - started < 1
        assert reader.latest_revision("org/a", "main") == "a2"


# --- transactions ---------------------------------------------------------------------------------------------


def test_exception_inside_a_transaction_leaves_no_partial_writes(tmp_path):
    with State.open(tmp_path) as s:
        with pytest.raises(RuntimeError), s.transaction():
            s.record_revision("org/a", "main", "a1")
            s.start_run("t", "cfg", {"org/a": "a1"})
            s.record_shard("t", "s1", "fp")
            raise RuntimeError("crash")
        assert s.latest_revision("org/a", "main") is None
        assert s.runs("t") == []
        assert s.shard_fingerprints("t") == {}

        # a nested block that fails undoes only its own writes
        with s.transaction():
            s.record_shard("t", "s1", "fp1")
            with pytest.raises(RuntimeError), s.transaction():
                s.record_shard("t", "s2", "fp2")
                raise RuntimeError("crash")
        assert s.shard_fingerprints("t") == {"s1": "fp1"}

        # a failure half-way through one call: the run row was inserted before the bad input
        with pytest.raises(StateError):
            s.start_run("t", "cfg", {"org/a": "a1", "org/b": ["not", "a", "sha"]})  # type: ignore[dict-item]
        assert s.runs("t") == []


def test_killed_process_mid_transaction_leaves_no_partial_writes(tmp_path):
    child = start_python(f"""
        import time
        from mergebot.daemon.state import State
        s = State.open({str(tmp_path)!r})
        with s.transaction():
            s.start_run("t", "cfg", {{"org/a": "a1"}})
            s.record_shard("t", "s1", "fp")
            print("in transaction", flush=True)
            time.sleep(60)
        """)
    kill9(child)
    with State.open(tmp_path) as s:
        assert s.runs("t") == []
        assert s.shard_fingerprints("t") == {}


def test_threads_share_one_state(state):
    def write(n: int) -> None:
        for i in range(50):
            state.record_shard("t", f"{n}-{i}", "fp")

    threads = [threading.Thread(target=write, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(state.shard_fingerprints("t")) == 400


# --- API round trips ------------------------------------------------------------------------------------------


def test_revisions(state):
    assert state.latest_revision("org/a", "main") is None
    assert state.record_revision("org/a", "main", "a1")
    assert not state.record_revision("org/a", "main", "a1")
    assert state.record_revision("org/a", "main", "a2")
    assert state.latest_revision("org/a", "main") == "a2"
    assert not state.record_revision("org/a", "main", "a1")  # the ref moved back to a sha seen before
    assert state.latest_revision("org/a", "main") == "a1"
    assert state.record_revision("org/a", "dev", "a1")  # another ref of the same repo
    assert state.latest_revision("org/b", "main") is None


def test_runs(state):
    assert state.last_run("t") is None and state.last_successful_run("t") is None
    before = time.time()
    first = state.start_run("t", "cfg1", {"org/a": "a1", "/models/b": "b1"})
    run = state.last_run("t")
    assert run is not None
    assert (run.id, run.target, run.config_hash, run.outcome, run.finished) == (first, "t", "cfg1", "running", None)
    assert run.inputs == {"org/a": "a1", "/models/b": "b1"}
    assert before <= run.started <= time.time()

    record = RunRecord(
        Outcome.PUBLISHED, published_sha="p1", computed=["s1", "s2"], reused=["s3"], downloaded_bytes=123
    )
    record.figures["merge_ppl"] = 5.5
    state.finish_run(first, record)
    run = state.last_run("t")
    assert (run.outcome, run.published_sha, run.record, run.reason, run.transient) == (
        "published",
        "p1",
        record,
        None,
        False,
    )
    assert run.finished is not None and run.finished >= run.started

    second = state.start_run("t", "cfg1", {"org/a": "a2"})
    state.finish_run(second, RunRecord(Outcome.FAILED, "HubError: 503"), transient=True)
    third = state.start_run("t", "cfg1", {"org/a": "a2"})
    state.finish_run(third, RunRecord(Outcome.UNCHANGED))
    fourth = state.start_run("t", "cfg2", {"org/a": "a2"})
    refused = RunRecord(Outcome.FAILED, "perplexity 9.1 above limit 7.0", figures={"merge_ppl": math.inf})
    state.finish_run(fourth, refused)

    assert [r.id for r in state.runs("t", limit=10)] == [fourth, third, second, first]
    assert [r.id for r in state.runs("t", limit=2)] == [fourth, third]
    assert state.last_run("t").reason == "perplexity 9.1 above limit 7.0"
    assert state.last_run("t").record == refused
    assert state.last_successful_run("t").id == third
    failed = state.runs("t")[2]
    assert (failed.outcome, failed.reason, failed.transient) == ("failed", "HubError: 503", True)
    assert state.runs("other") == []


def test_finish_run_refuses_bad_calls(state):
    run_id = state.start_run("t", "cfg", {})
    with pytest.raises(ValueError, match="outcome must be one of"):
        state.finish_run(run_id, RunRecord("running"))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="published sha"):
        state.finish_run(run_id, RunRecord(Outcome.PUBLISHED))
    with pytest.raises(StateError, match="no run 999"):
        state.finish_run(999, RunRecord(Outcome.FAILED))
    state.finish_run(run_id, RunRecord(Outcome.FAILED, "x"))
    with pytest.raises(StateError, match="already finished as 'failed'"):
        state.finish_run(run_id, RunRecord(Outcome.UNCHANGED))


def test_run_left_running_by_a_killed_daemon_is_marked_interrupted(tmp_path):
    with State.open(tmp_path) as s:
        done = s.start_run("t", "cfg", {"org/a": "a1"})
        s.finish_run(done, RunRecord(Outcome.PUBLISHED, published_sha="p1"))
    child = start_python(f"""
        import time
        from mergebot.daemon.state import State
        s = State.open({str(tmp_path)!r})
        print(s.start_run("t", "cfg", {{"org/a": "a2"}}), flush=True)
        time.sleep(60)
        """)
    kill9(child)
    with State.open(tmp_path) as s:
        assert s.last_run("t").outcome == "running"  # detectable
        interrupted = s.mark_interrupted_runs()
        assert [(r.target, r.outcome, r.transient, r.inputs) for r in interrupted] == [
            ("t", "interrupted", True, {"org/a": "a2"})
        ]
        assert interrupted[0].reason and interrupted[0].finished is not None
        assert s.last_run("t") == interrupted[0]
        assert s.last_successful_run("t").id == done
        assert s.mark_interrupted_runs() == []
        with pytest.raises(StateError, match="already finished as 'interrupted'"):
            s.finish_run(interrupted[0].id, RunRecord(Outcome.PUBLISHED, published_sha="p2"))


def test_shard_fingerprints(state):
    assert state.shard_fingerprints("t") == {}
    state.record_shard("t", "model-00001.safetensors", "fp1")
    state.record_shard("t", "model-00002.safetensors", "fp2")
    state.record_shard("t", "model-00001.safetensors", "fp1b")
    state.record_shard("u", "model-00001.safetensors", "other")
    assert state.shard_fingerprints("t") == {"model-00001.safetensors": "fp1b", "model-00002.safetensors": "fp2"}
    assert state.shard_fingerprints("u") == {"model-00001.safetensors": "other"}


def test_target_status(state):
    assert state.target_status("t") is None
    message = "failed: perplexity above limit; waits for new inputs or a config change"
    state.set_target_status("t", TargetState.WAITING_FOR_CHANGE, message, None)
    status = state.target_status("t")
    assert (status.target, status.state, status.waiting_reason, status.next_check) == (
        "t",
        TargetState.WAITING_FOR_CHANGE,
        message,
        None,
    )
    assert status.updated <= time.time()
    state.set_target_status("t", TargetState.UP_TO_DATE, None, 1234.5)
    status = state.target_status("t")
    assert (status.state, status.waiting_reason, status.next_check) == (TargetState.UP_TO_DATE, None, 1234.5)


def test_published_inputs_are_those_of_each_targets_last_published_run(state):
    assert state.published_inputs() == set()
    old = state.start_run("t", "cfg", {"org/a": "a1", "org/b": "b1"})
    state.finish_run(old, RunRecord(Outcome.PUBLISHED, published_sha="p1"))
    new = state.start_run("t", "cfg", {"org/a": "a2", "org/b": "b1"})
    state.finish_run(new, RunRecord(Outcome.PUBLISHED, published_sha="p2"))
    failed = state.start_run("t", "cfg", {"org/a": "a3", "org/b": "b1"})
    state.finish_run(failed, RunRecord(Outcome.FAILED, "x"))
    other = state.start_run("u", "cfg", {"org/a": "a1", "/local/c": "c1"})
    state.finish_run(other, RunRecord(Outcome.PUBLISHED, published_sha="q1"))
    state.start_run("v", "cfg", {"org/z": "z1"})  # never finished
    assert state.published_inputs() == {("org/a", "a2"), ("org/b", "b1"), ("org/a", "a1"), ("/local/c", "c1")}


# --- the daemon lock ------------------------------------------------------------------------------------------


def test_lock_is_exclusive_and_released_on_close(tmp_path):
    with closing(acquire_lock(tmp_path / "new")) as lock:
        assert lock.path == tmp_path / "new" / LOCK_FILE
        assert lock.path.read_text() == f"{os.getpid()}\n"
        with pytest.raises(StateError, match=f"another mergebot daemon holds .*{LOCK_FILE} \\(pid {os.getpid()}\\)"):
            acquire_lock(tmp_path / "new")
    acquire_lock(tmp_path / "new").close()


def test_lock_held_by_another_process_is_refused_until_that_process_is_killed(tmp_path):
    child = start_python(f"""
        import time
        from mergebot.daemon.lock import acquire_lock
        lock = acquire_lock({str(tmp_path)!r})
        print("locked", flush=True)
        time.sleep(60)
        """)
    try:
        with pytest.raises(StateError) as refused:
            acquire_lock(tmp_path)
        assert str(refused.value) == f"another mergebot daemon holds {tmp_path / LOCK_FILE} (pid {child.pid})"
        with State.open(tmp_path, readonly=False) as s:  # the database itself is not locked
            s.record_revision("org/a", "main", "a1")
    finally:
        kill9(child)
    with closing(acquire_lock(tmp_path)) as lock:
        assert lock.path.read_text() == f"{os.getpid()}\n"
