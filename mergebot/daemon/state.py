"""The daemon's memory: upstream revisions seen, runs, per-shard fingerprints, target status,
releases of held targets.

One SQLite file under `state_dir`, in WAL mode so `mergebot status` can read while the daemon writes. Every write
runs in one `BEGIN IMMEDIATE` transaction, so a crash or exception leaves either all of it or none of it. The schema
and its migrations are in `schema.py`.

Timestamps are unix seconds (float) everywhere: UTC by definition, cheap to compare with `time.time()`, and the
same type apscheduler and `next_check` arithmetic use.

Thread safety: one connection per `State`, shared by all threads and serialised by a re-entrant lock. The daemon's
writes are few and small and SQLite admits one writer at a time anyway, so per-thread connections would add
connections to close and nothing in throughput. Keep `transaction()` blocks short: other threads wait on them.
"""

import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from enum import StrEnum
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from mergebot.daemon.runs import OUTCOMES, RUN_COLUMNS, RUNNING, Run, run_from_row
from mergebot.daemon.schema import check_version, enable_wal, migrate
from mergebot.errors import StateError
from mergebot.log import redact
from mergebot.runrecord import Outcome, RunRecord, to_json

STATE_FILE = "state.sqlite3"
# Long enough to outwait any write the daemon or its child makes (all are small), short enough that a wedged
# writer surfaces as an error instead of a hang.
BUSY_TIMEOUT_S = 5.0


class TargetState(StrEnum):
    """Where a target stands. The scheduler decides on this; people read the message recorded beside it."""

    UP_TO_DATE = "up_to_date"
    DUE = "due"  # a run is scheduled
    WAITING_FOR_WINDOW = "waiting_for_window"  # due, and nightly: it runs in the next cron window
    RETRYING = "retrying"  # a transient failure; a retry is scheduled with backoff
    GAVE_UP = "gave_up"  # out of retries; the next check that finds it due tries again
    WAITING_FOR_CHANGE = "waiting_for_change"  # failed permanently; waits for new inputs or a config change
    CHECK_FAILED = "check_failed"  # its inputs could not be checked (Hub unreachable, repo missing, no access)
    HELD = "held"  # worse than its last publish; waits for new inputs, a config change or `mergebot release`


@dataclass(frozen=True)
class TargetStatus:
    """What `mergebot status` shows for a target besides its runs: where it stands, why, and when it is next
    looked at."""

    target: str
    state: TargetState
    waiting_reason: str | None
    next_check: float | None
    updated: float


class State:
    """The state database. Open with `State.open(state_dir)`; use as a context manager or call `close()`."""

    def __init__(self, path: str | Path, *, readonly: bool = False) -> None:
        """Open (and, unless `readonly`, create, switch to WAL and migrate) the database file at `path`.

        Read-only opens take no write lock of any kind, so they never hold up the daemon; they require a file
        already at this mergebot's schema version, since they cannot migrate it.
        """
        self.path = Path(path)
        self.readonly = readonly
        self._lock = threading.RLock()
        if readonly and not self.path.is_file():
            raise StateError(f"no mergebot state at {self.path}: no daemon has run with this state_dir yet")
        if not readonly:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        target = self.path.resolve().as_uri() + "?mode=ro" if readonly else str(self.path)
        try:
            self._db = sqlite3.connect(
                target, uri=readonly, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as e:
            raise StateError(f"cannot open state database {self.path}: {e}") from e
        try:
            with self._errors():
                self._db.execute("PRAGMA foreign_keys = ON")
                # before WAL or migrations touch a file this mergebot must not change
                check_version(self._db, self.path, readonly=readonly)
                if not readonly:
                    enable_wal(self._db, self.path)
                    self._migrate()
        except BaseException:
            self._db.close()
            raise

    @classmethod
    def open(cls, state_dir: str | Path, readonly: bool = False) -> Self:
        """The state database of `state_dir` (`state_dir/state.sqlite3`)."""
        return cls(Path(state_dir) / STATE_FILE, readonly=readonly)

    def close(self) -> None:
        """Close the connection; an unfinished transaction is rolled back. Safe to call twice."""
        with self._lock:
            self._db.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # --- transactions -------------------------------------------------------------------------------------------

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """All API writes inside land together or not at all (e.g. finishing a run and updating the status).

        A nested block is a savepoint: if it raises, only its own writes are undone.
        """
        with self._write():
            yield

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One transaction, or a savepoint inside the enclosing one. `BEGIN IMMEDIATE` takes the write lock up
        front, so a transaction never fails half-way on a lock upgrade."""
        with self._lock, self._errors():
            if self.readonly:
                raise StateError(f"state database {self.path} is open read-only")
            outer = not self._db.in_transaction
            self._db.execute("BEGIN IMMEDIATE" if outer else "SAVEPOINT nested")
            try:
                yield self._db
            except BaseException:
                # An I/O or disk-full error may already have rolled the whole transaction back.
                if self._db.in_transaction:
                    if outer:
                        self._db.execute("ROLLBACK")
                    else:
                        self._db.execute("ROLLBACK TO nested")
                        self._db.execute("RELEASE nested")
                raise
            try:
                self._db.execute("COMMIT" if outer else "RELEASE nested")
            except BaseException:
                if outer and self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise

    @contextmanager
    def _reading(self) -> Iterator[sqlite3.Connection]:
        with self._lock, self._errors():
            yield self._db

    @contextmanager
    def _errors(self) -> Iterator[None]:
        """sqlite3 errors become StateError naming the file: callers handle one exception type per subsystem."""
        try:
            yield
        except sqlite3.Error as e:
            raise StateError(f"state database {self.path}: {e}") from e

    # --- schema -------------------------------------------------------------------------------------------------

    def _migrate(self) -> None:
        with self._write() as db:
            migrate(db, self.path)

    # --- upstream revisions -------------------------------------------------------------------------------------

    def record_revision(self, repo: str, ref: str, sha: str) -> bool:
        """Note that `ref` of `repo` points at `sha` now. True the first time this (repo, ref, sha) is seen."""
        now = time.time()
        with self._write() as db:
            inserted = db.execute(
                "INSERT OR IGNORE INTO revisions (repo, ref, sha, first_seen) VALUES (?, ?, ?, ?)",
                (repo, ref, sha, now),
            ).rowcount
            db.execute(
                "INSERT INTO refs (repo, ref, sha, seen) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (repo, ref) DO UPDATE SET sha = excluded.sha, seen = excluded.seen",
                (repo, ref, sha, now),
            )
        return inserted == 1

    def latest_revision(self, repo: str, ref: str) -> str | None:
        """The sha `ref` of `repo` pointed at when last checked, or None if never checked."""
        with self._reading() as db:
            row = db.execute("SELECT sha FROM refs WHERE repo = ? AND ref = ?", (repo, ref)).fetchone()
        return row[0] if row else None

    # --- runs ---------------------------------------------------------------------------------------------------

    def start_run(
        self, target: str, config_hash: str, inputs: Mapping[str, str], digests: Mapping[str, str] | None = None
    ) -> int:
        """Record a run as started with what the daemon resolved for it: the input shas it merges (repo id or local
        path -> sha) and their content digests, kept as the run's record until it finishes; returns its id."""
        started = RunRecord(inputs=dict(inputs), digests=dict(digests or {}))
        with self._write() as db:
            run_id = db.execute(
                "INSERT INTO runs (target, config_hash, started, details) VALUES (?, ?, ?, ?)",
                (target, config_hash, time.time(), to_json(started)),
            ).lastrowid
            db.executemany(
                "INSERT INTO run_inputs (run_id, source, sha) VALUES (?, ?, ?)",
                [(run_id, source, sha) for source, sha in inputs.items()],
            )
        assert run_id is not None  # an INSERT always sets it
        return run_id

    def finish_run(self, run_id: int, record: RunRecord, *, transient: bool = False) -> None:
        """Record how a run ended: its outcome, reason and published sha as the record says, and the record.
        `transient` failures are retried with backoff; others wait for a change."""
        if record.outcome not in OUTCOMES:
            raise ValueError(f"outcome must be one of {', '.join(OUTCOMES)}, not {record.outcome!r}")
        if record.outcome == Outcome.PUBLISHED and not record.published_sha:
            raise ValueError("a published run needs the published sha")
        record = replace(record, reason=record.reason and redact(record.reason))
        with self._write() as db:
            row = db.execute("SELECT outcome FROM runs WHERE id = ?", (run_id,)).fetchone()
            if row is None:
                raise StateError(f"no run {run_id} in {self.path}")
            if row[0] != RUNNING:
                raise StateError(f"run {run_id} already finished as {row[0]!r}")
            db.execute(
                "UPDATE runs SET finished = ?, outcome = ?, reason = ?, transient = ?, published_sha = ?, details = ? "
                "WHERE id = ?",
                (
                    time.time(),
                    str(record.outcome),
                    record.reason,
                    transient,
                    record.published_sha,
                    to_json(record),
                    run_id,
                ),
            )

    def running_runs(self) -> list[Run]:
        """Runs still "running": on daemon start-up (holding the lock), those of a dead process."""
        return self._select_runs("outcome = ? ORDER BY id", (RUNNING,))

    def mark_interrupted_runs(self, reason: str = "the daemon stopped before the run finished") -> list[Run]:
        """Mark every run still "running" as interrupted (transient, so it is retried) and return them.

        Call it on daemon start-up while holding the daemon lock: then no live process can own such a run.
        """
        with self._write() as db:
            ids = [row[0] for row in db.execute("SELECT id FROM runs WHERE outcome = ?", (RUNNING,))]
            if not ids:
                return []
            db.execute(
                "UPDATE runs SET finished = ?, outcome = 'interrupted', reason = ?, transient = 1 WHERE outcome = ?",
                (time.time(), reason, RUNNING),
            )
            return self._select_runs(f"id IN ({', '.join('?' * len(ids))}) ORDER BY id", ids)

    def last_run(self, target: str) -> Run | None:
        """The target's most recent run, finished or not."""
        runs = self.runs(target, limit=1)
        return runs[0] if runs else None

    def last_successful_run(self, target: str) -> Run | None:
        """The most recent run that published or found nothing to publish: the baseline for "is the target due?"
        and the last publish that the merge child compares a new run with."""
        runs = self._select_runs(
            "target = ? AND outcome IN ('published', 'unchanged') ORDER BY id DESC LIMIT 1", (target,)
        )
        return runs[0] if runs else None

    def runs(self, target: str, limit: int = 20) -> list[Run]:
        """The target's runs, newest first."""
        return self._select_runs("target = ? ORDER BY id DESC LIMIT ?", (target, limit))

    def _select_runs(self, clause: str, params: Sequence[Any]) -> list[Run]:
        """Runs matching `clause` (a WHERE condition plus ORDER BY/LIMIT), each with its inputs."""
        with self._reading() as db:
            rows = db.execute(f"SELECT {RUN_COLUMNS} FROM runs WHERE {clause}", params).fetchall()
            inputs: dict[int, dict[str, str]] = {row[0]: {} for row in rows}
            if rows:
                marks = ", ".join("?" * len(rows))
                query = f"SELECT run_id, source, sha FROM run_inputs WHERE run_id IN ({marks}) ORDER BY source"
                for run_id, source, sha in db.execute(query, list(inputs)):
                    inputs[run_id][source] = sha
        return [run_from_row(row, inputs[row[0]]) for row in rows]

    def published_inputs(self) -> set[tuple[str, str]]:
        """(repo or path, sha) of every input of each target's last published run: what cache hygiene must keep."""
        with self._reading() as db:
            rows = db.execute(
                "SELECT DISTINCT i.source, i.sha FROM run_inputs AS i JOIN "
                "(SELECT max(id) AS id FROM runs WHERE outcome = 'published' GROUP BY target) AS p ON i.run_id = p.id"
            ).fetchall()
        return {(source, sha) for source, sha in rows}

    # --- shard fingerprints -------------------------------------------------------------------------------------

    def record_shard(self, target: str, shard_name: str, fingerprint: str) -> None:
        """Remember that the output shard `shard_name` was finished with `fingerprint` (after its rename)."""
        with self._write() as db:
            db.execute(
                "INSERT INTO shards (target, name, fingerprint, recorded) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (target, name) DO UPDATE SET "
                "fingerprint = excluded.fingerprint, recorded = excluded.recorded",
                (target, shard_name, fingerprint, time.time()),
            )

    def shard_fingerprints(self, target: str) -> dict[str, str]:
        """Shard name -> fingerprint of every finished shard of the target."""
        with self._reading() as db:
            rows = db.execute("SELECT name, fingerprint FROM shards WHERE target = ? ORDER BY name", (target,))
            return dict(rows.fetchall())

    # --- releases of held targets -------------------------------------------------------------------------------

    def request_release(self, target: str) -> Run | None:
        """Let the next run of a held target skip the comparison with its last publish (the gate still applies).

        Returns the run that holds it, or None (and records nothing) when the target is not held: its status is
        not HELD (inputs that went back to the published ones end a hold too) or its last run is not the held one.
        The check and the write are one transaction, so a run that starts meanwhile either comes first (and
        nothing is recorded) or finds the release when its child reads it.
        """
        with self._write() as db:
            status, last = self.target_status(target), self.last_run(target)
            if status is None or status.state != TargetState.HELD or last is None or last.outcome != Outcome.HELD:
                return None
            db.execute(
                "INSERT INTO releases (target, requested) VALUES (?, ?) "
                "ON CONFLICT (target) DO UPDATE SET requested = excluded.requested",
                (target, time.time()),
            )
        return last

    def releases(self) -> set[str]:
        """The targets with a release not yet used up by a run."""
        with self._reading() as db:
            return {row[0] for row in db.execute("SELECT target FROM releases")}

    def clear_release(self, target: str) -> None:
        """The release was used: a run that read it ended for good (not a transient failure, which retries)."""
        with self._write() as db:
            db.execute("DELETE FROM releases WHERE target = ?", (target,))

    # --- target status ------------------------------------------------------------------------------------------

    def set_target_status(
        self, target: str, state: TargetState, waiting_reason: str | None, next_check: float | None
    ) -> None:
        """Record where the target stands, why it is waiting (None: it is not) and when it is next checked."""
        with self._write() as db:
            db.execute(
                "INSERT INTO target_status (target, state, waiting_reason, next_check, updated) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (target) DO UPDATE SET state = excluded.state, waiting_reason = excluded.waiting_reason, "
                "next_check = excluded.next_check, updated = excluded.updated",
                (target, state.value, waiting_reason and redact(waiting_reason), next_check, time.time()),
            )

    def target_status(self, target: str) -> TargetStatus | None:
        """The target's last recorded status, or None if the daemon never recorded one."""
        with self._reading() as db:
            row = db.execute(
                "SELECT target, state, waiting_reason, next_check, updated FROM target_status WHERE target = ?",
                (target,),
            ).fetchone()
        if row is None:
            return None
        name, state, waiting_reason, next_check, updated = row
        return TargetStatus(name, TargetState(state), waiting_reason, next_check, updated)
