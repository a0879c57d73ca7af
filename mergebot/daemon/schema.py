"""The state database's file format: WAL journal, and the schema versioned with `PRAGMA user_version` and the
ordered `MIGRATIONS`.

Opening an older file upgrades it in a single transaction; a file from a newer mergebot is refused rather than
guessed at.
"""

import sqlite3
from pathlib import Path

from mergebot.errors import StateError

# Append only: a released step never changes, since files already at that version will not run it again.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    # 1: history — revisions seen, runs and their inputs, per-shard fingerprints.
    (
        """CREATE TABLE revisions (
            repo TEXT NOT NULL, ref TEXT NOT NULL, sha TEXT NOT NULL, first_seen REAL NOT NULL,
            PRIMARY KEY (repo, ref, sha)
        ) WITHOUT ROWID""",
        # Where each ref points now: a ref may move back to a sha seen before, so `revisions` alone can't say.
        """CREATE TABLE refs (
            repo TEXT NOT NULL, ref TEXT NOT NULL, sha TEXT NOT NULL, seen REAL NOT NULL,
            PRIMARY KEY (repo, ref)
        ) WITHOUT ROWID""",
        """CREATE TABLE runs (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            target TEXT NOT NULL,
            config_hash TEXT NOT NULL,
            started REAL NOT NULL,
            finished REAL,
            outcome TEXT NOT NULL DEFAULT 'running'
                CHECK (outcome IN ('running', 'published', 'failed', 'unchanged', 'interrupted')),
            reason TEXT,
            transient INTEGER NOT NULL DEFAULT 0,
            published_sha TEXT,
            details TEXT
        )""",
        "CREATE INDEX runs_by_target ON runs (target, outcome, id)",
        """CREATE TABLE run_inputs (
            run_id INTEGER NOT NULL REFERENCES runs (id), source TEXT NOT NULL, sha TEXT NOT NULL,
            PRIMARY KEY (run_id, source)
        ) WITHOUT ROWID""",
        """CREATE TABLE shards (
            target TEXT NOT NULL, name TEXT NOT NULL, fingerprint TEXT NOT NULL, recorded REAL NOT NULL,
            PRIMARY KEY (target, name)
        ) WITHOUT ROWID""",
    ),
    # 2: caches and status — parent perplexities, why each target waits and when it is next checked.
    (
        # ppl NULL means NaN: SQLite stores a NaN as NULL, and a parent that scores NaN is a cacheable result too.
        # eval_hash is how the perplexity was measured (the eval text and the windows).
        """CREATE TABLE parent_perplexity (
            repo TEXT NOT NULL, sha TEXT NOT NULL, eval_hash TEXT NOT NULL, ppl REAL, recorded REAL NOT NULL,
            PRIMARY KEY (repo, sha, eval_hash)
        ) WITHOUT ROWID""",
        """CREATE TABLE target_status (
            target TEXT PRIMARY KEY, waiting_reason TEXT, next_check REAL, updated REAL NOT NULL
        ) WITHOUT ROWID""",
    ),
    # 3: the target's state as a value the scheduler decides on (state.TargetState); waiting_reason stays the
    # message for people. Rows written before it get the state their message meant then.
    (
        "ALTER TABLE target_status ADD COLUMN state TEXT NOT NULL DEFAULT 'up_to_date'",
        """UPDATE target_status SET state = CASE
            WHEN waiting_reason IS NULL THEN 'up_to_date'
            WHEN waiting_reason LIKE 'due (%); waits for the nightly window%' THEN 'waiting_for_window'
            WHEN waiting_reason LIKE 'due (%' THEN 'due'
            WHEN waiting_reason LIKE 'retrying in %' THEN 'retrying'
            WHEN waiting_reason LIKE 'gave up after %' THEN 'gave_up'
            WHEN waiting_reason LIKE 'cannot check inputs: %' THEN 'check_failed'
            ELSE 'waiting_for_change'
        END""",
    ),
    # 4: a run may end "held" (worse than the target's last publish), and a person may release a held target.
    # SQLite cannot change a CHECK constraint in place, so runs is rebuilt with every row. run_inputs is rebuilt
    # with it, pointing at the new table: dropping the old one while rows refer to it would fail (foreign keys are
    # on), and renaming the new one to runs renames that reference too. The AUTOINCREMENT counter is carried
    # over, so no run id is ever given out twice.
    (
        """CREATE TABLE runs_v4 (
            id INTEGER PRIMARY KEY AUTOINCREMENT, target TEXT NOT NULL, config_hash TEXT NOT NULL,
            started REAL NOT NULL, finished REAL,
            outcome TEXT NOT NULL DEFAULT 'running'
                CHECK (outcome IN ('running', 'published', 'failed', 'unchanged', 'interrupted', 'held')),
            reason TEXT, transient INTEGER NOT NULL DEFAULT 0, published_sha TEXT, details TEXT
        )""",
        "INSERT INTO runs_v4 SELECT id, target, config_hash, started, finished, outcome, reason, transient, "
        "published_sha, details FROM runs",
        "DELETE FROM sqlite_sequence WHERE name = 'runs_v4'",
        "INSERT INTO sqlite_sequence (name, seq) SELECT 'runs_v4', seq FROM sqlite_sequence WHERE name = 'runs'",
        """CREATE TABLE run_inputs_v4 (
            run_id INTEGER NOT NULL REFERENCES runs_v4 (id), source TEXT NOT NULL, sha TEXT NOT NULL,
            PRIMARY KEY (run_id, source)
        ) WITHOUT ROWID""",
        "INSERT INTO run_inputs_v4 SELECT run_id, source, sha FROM run_inputs",
        "DROP TABLE run_inputs",
        "DROP TABLE runs",
        "ALTER TABLE runs_v4 RENAME TO runs",
        "ALTER TABLE run_inputs_v4 RENAME TO run_inputs",
        "CREATE INDEX runs_by_target ON runs (target, outcome, id)",
        # One pending release per target; the run that uses it up deletes it.
        "CREATE TABLE releases (target TEXT PRIMARY KEY, requested REAL NOT NULL) WITHOUT ROWID",
    ),
    # 5: parents' measurements moved to files in mergebot's cache directory (mergebot.pipeline.parents), which the
    # CLI and the daemon's child share; the table's perplexities alone no longer make a gate decision.
    ("DROP TABLE parent_perplexity",),
    # 6: a run may end "internal_error" (an unexpected exception in the merge child). Rebuilt as in 4.
    (
        """CREATE TABLE runs_v6 (
            id INTEGER PRIMARY KEY AUTOINCREMENT, target TEXT NOT NULL, config_hash TEXT NOT NULL,
            started REAL NOT NULL, finished REAL,
            outcome TEXT NOT NULL DEFAULT 'running' CHECK (outcome IN
                ('running', 'published', 'failed', 'unchanged', 'interrupted', 'held', 'internal_error')),
            reason TEXT, transient INTEGER NOT NULL DEFAULT 0, published_sha TEXT, details TEXT
        )""",
        "INSERT INTO runs_v6 SELECT id, target, config_hash, started, finished, outcome, reason, transient, "
        "published_sha, details FROM runs",
        "DELETE FROM sqlite_sequence WHERE name = 'runs_v6'",
        "INSERT INTO sqlite_sequence (name, seq) SELECT 'runs_v6', seq FROM sqlite_sequence WHERE name = 'runs'",
        """CREATE TABLE run_inputs_v6 (
            run_id INTEGER NOT NULL REFERENCES runs_v6 (id), source TEXT NOT NULL, sha TEXT NOT NULL,
            PRIMARY KEY (run_id, source)
        ) WITHOUT ROWID""",
        "INSERT INTO run_inputs_v6 SELECT run_id, source, sha FROM run_inputs",
        "DROP TABLE run_inputs",
        "DROP TABLE runs",
        "ALTER TABLE runs_v6 RENAME TO runs",
        "ALTER TABLE run_inputs_v6 RENAME TO run_inputs",
        "CREATE INDEX runs_by_target ON runs (target, outcome, id)",
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)


def check_version(db: sqlite3.Connection, path: Path, *, readonly: bool) -> int:
    """The file's schema version, after refusing a file that is not ours or that this mergebot cannot use."""
    version = db.execute("PRAGMA user_version").fetchone()[0]
    if version == 0 and db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]:
        raise StateError(f"{path} is a SQLite database but not a mergebot state database")
    if version > SCHEMA_VERSION:
        raise StateError(
            f"state database {path} has schema version {version}, newer than this mergebot supports "
            f"({SCHEMA_VERSION}); upgrade mergebot or use another state_dir"
        )
    if readonly and version < SCHEMA_VERSION:
        raise StateError(
            f"state database {path} has schema version {version}, older than this mergebot's "
            f"({SCHEMA_VERSION}); start the daemon once to migrate it"
        )
    return version


def enable_wal(db: sqlite3.Connection, path: Path) -> None:
    """WAL lets `mergebot status` and the merge children read while the daemon writes."""
    mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    if mode.lower() != "wal":
        raise StateError(
            f"state database {path}: cannot switch to WAL mode (got {mode!r}); put state_dir on a local filesystem"
        )
    # Writes are rare and small, so pay for a full fsync per commit: a power cut must not lose a recorded shard.
    db.execute("PRAGMA synchronous = FULL")


def migrate(db: sqlite3.Connection, path: Path) -> None:
    """Bring the file to SCHEMA_VERSION; the caller holds the write transaction, so a concurrent opener waits and
    then finds it done."""
    version = check_version(db, path, readonly=False)  # again: another process may have migrated it since
    for steps in MIGRATIONS[version:]:
        for sql in steps:
            db.execute(sql)
    if version != SCHEMA_VERSION:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
