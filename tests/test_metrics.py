"""The Prometheus text the daemon serves, from a real state file: bytes per target, holds, time since a publish."""

import sqlite3
import time

from mergebot.config.daemon import load_daemon_config
from mergebot.daemon.state import STATE_FILE, State
from mergebot.daemon.status import metrics_text
from mergebot.runrecord import Outcome, RunRecord
from tests.test_daemon import target


def test_bytes_holds_and_the_time_since_the_last_publish_per_target(tmp_path):
    config_path = tmp_path / "mergebot.toml"
    config_path.write_text('[daemon]\nstate_dir = "state"\n' + target("a") + target("b"))
    config = load_daemon_config(config_path)
    with State.open(config.daemon.state_dir) as state:
        runs = [
            RunRecord(Outcome.PUBLISHED, downloaded_bytes=1000, uploaded_bytes=300, published_sha="p1"),
            RunRecord(Outcome.HELD, downloaded_bytes=50),
            RunRecord(Outcome.FAILED),  # a child that died wrote no record
            RunRecord(Outcome.UNCHANGED, downloaded_bytes=7, published_sha="p1"),
        ]
        ids = []
        for record in runs:
            ids.append(state.start_run("a", "cfg", {"org/base": "b1"}))
            state.finish_run(ids[-1], record)
    db = sqlite3.connect(config.daemon.state_dir / STATE_FILE)
    with db:
        db.execute("UPDATE runs SET finished = ? WHERE id = ?", (time.time() - 3600, ids[0]))
    db.close()
    with State.open(config.daemon.state_dir, readonly=True) as state:
        lines = metrics_text(config, state).splitlines()
    assert 'mergebot_downloaded_bytes_total{target="a"} 1057' in lines
    assert 'mergebot_uploaded_bytes_total{target="a"} 300' in lines
    assert 'mergebot_downloaded_bytes_total{target="b"} 0' in lines
    assert 'mergebot_uploaded_bytes_total{target="b"} 0' in lines
    assert 'mergebot_holds_total{target="a"} 1' in lines
    (since,) = [line for line in lines if line.startswith("mergebot_seconds_since_last_publish")]
    assert since.startswith('mergebot_seconds_since_last_publish{target="a"} ')
    assert 3600 <= float(since.split()[-1]) < 3660, "an unchanged run after the publish is not a publish"
    for name, kind in (("downloaded_bytes_total", "counter"), ("seconds_since_last_publish", "gauge")):
        assert f"# TYPE mergebot_{name} {kind}" in lines
