"""The real daemon reloading its config (an edit it notices, or SIGHUP): a file that is not UTF-8, missing for a
moment or nested too deeply keeps the running config with one line, and so does an edit of a setting only read at
start, with a line saying a restart is needed; the daemon never dies of a reload."""

import os
import signal
from pathlib import Path

from mergebot.errors import ExitCode
from tests.helpers import run_cli_process
from tests.lone_daemon import EmptyMirror, LoneDaemon, free_port, wait_for
from tests.test_daemon import target

REJECTED = "config rejected, keeping the running one"
RESTART = "config change needs a restart, keeping the running one"


def replace(path: Path, data: bytes) -> None:
    """As an editor saves: the new file takes the old one's name at once (the daemon never reads half of it)."""
    temporary = path.with_suffix(".swp")
    temporary.write_bytes(data)
    os.replace(temporary, path)


def test_a_reload_never_stops_the_daemon_and_keeps_the_running_config(tmp_path):
    mirror = EmptyMirror()
    lone = LoneDaemon(tmp_path, f"http://127.0.0.1:{mirror.port}")
    lone.write_config()
    good = lone.config.read_bytes()
    try:
        lone.start()
        replace(lone.config, good + b"\n# caf\xe9, in Latin-1\n")
        (not_utf8,) = wait_for(lambda: lone.logged(REJECTED), 30, "the edit that is not UTF-8 to be rejected")
        assert not_utf8["problem"] == f"{lone.config}: config is not UTF-8 text (byte {len(good) + 6})"

        lone.config.unlink()  # an editor's save, half done
        lone.process.send_signal(signal.SIGHUP)
        missing = wait_for(lambda: lone.logged(REJECTED)[1:], 30, "the reload of a missing file to be rejected")
        assert missing[0]["problem"] == f"{lone.config}: cannot read {lone.config.name} (No such file or directory)"

        replace(lone.config, good.replace(b"[[targets]]", b"x = " + b"[" * 5000 + b"]" * 5000 + b"\n[[targets]]"))
        deep = wait_for(lambda: lone.logged(REJECTED)[2:], 30, "the deeply nested edit to be rejected")
        assert deep[0]["problem"] == f"{lone.config}: invalid TOML: nested too deeply"

        moved = good.replace(b'state_dir = "state"', b'state_dir = "elsewhere"')
        listening = moved.replace(b"[[targets]]", f'metrics_listen = "127.0.0.1:{free_port()}"\n[[targets]]'.encode())
        replace(lone.config, listening + target("second", models=("missing",)).encode())
        (restart,) = wait_for(lambda: lone.logged(RESTART), 30, "the state_dir edit to be refused")
        assert restart["keys"] == ["daemon.state_dir", "daemon.metrics_listen"]
        assert not (tmp_path / "elsewhere").exists(), "the lock and the database stay where they are"

        replace(lone.config, good + target("second", models=("missing",)).encode())
        (reloaded,) = wait_for(lambda: lone.logged("config reloaded"), 30, "the good edit to be adopted")
        assert reloaded["targets"] == ["lone", "second"]
        assert len(lone.logged(REJECTED)) == 3 and len(lone.logged(RESTART)) == 1, "one line each"
        assert lone.process.poll() is None
        assert lone.stop() == 0
        assert "Traceback" not in lone.text()
    finally:
        lone.kill()
        mirror.close()


def test_a_config_that_is_not_utf8_stops_the_start_with_one_line(tmp_path):
    config = tmp_path / "mergebot.toml"
    data = b'[daemon]\nstate_dir = "state"\n# caf\xe9\n'
    config.write_bytes(data)
    result = run_cli_process("run", "--config", config, cwd=tmp_path, timeout=60)
    assert result.returncode == ExitCode.PERMANENT
    assert result.stderr.strip() == f"mergebot: error: {config}: config is not UTF-8 text (byte {data.index(0xE9)})"
