"""Credentials in an endpoint URL (`http://user:password@host`) are used but never shown: not in the log, the
reasons the state records, `mergebot status`, the status page, /status.json, the notifications, nor the CLI's
error line. One helper (log.redact) does it; each surface is tested here."""

import json

import pytest
import requests

from mergebot.daemon.state import State
from mergebot.errors import ExitCode
from mergebot.log import redact
from tests.helpers import run_cli_process
from tests.lone_daemon import EmptyMirror, LoneDaemon, free_port, listeners, wait_for
from tests.test_notify import daemon, record  # noqa: F401 (the fixture)

PASSWORD = "pa55-w0rd"
CREDENTIALS = f"mirror-user:{PASSWORD}"


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("not found on http://u:p@127.0.0.1:8/x, or", "not found on http://***@127.0.0.1:8/x, or"),
        ("https://tok@host/a and HTTP://u:p@ss@h/b", "https://***@host/a and HTTP://***@h/b"),
        ("GET https://h/x?a=1&token=abc&sig=d%2F b", "GET https://h/x?a=1&token=***&sig=*** b"),
        ("token hf_abcdefghijklmnopqrstuvwxyz0123 used", "token hf_*** used"),
        ("org/model@3f2a1b2c and http://host/a@b?page=2", "org/model@3f2a1b2c and http://host/a@b?page=2"),
    ],
)
def test_redact(text, shown):
    assert redact(text) == shown


def test_every_surface_of_the_daemon_hides_the_read_endpoints_credentials(tmp_path):
    mirror = EmptyMirror(CREDENTIALS)
    endpoint = f"http://{CREDENTIALS}@127.0.0.1:{mirror.port}"
    metrics = free_port()
    lone = LoneDaemon(tmp_path, "http://127.0.0.1:1", env={"HOOK_SECRET": "s"})
    lone.write_config(f'read_endpoint = "{endpoint}"\n' + listeners(free_port(), metrics))
    try:
        lone.start()
        wait_for(lambda: lone.logged("check failed"), 60, "the check through the mirror")
        assert mirror.authorizations and None not in mirror.authorizations, "the credentials are used"
        shown = f"http://***@127.0.0.1:{mirror.port}"
        status = json.loads(run_cli_process("status", "--config", lone.config, "--json", cwd=tmp_path).stdout)
        assert shown in status["targets"]["lone"]["waiting"]
        surfaces = {
            "log": lone.text(),
            "status": run_cli_process("status", "--config", lone.config, cwd=tmp_path).stdout,
            "status --json": json.dumps(status),
            "page": requests.get(f"http://127.0.0.1:{metrics}/", timeout=10).text,
            "status.json": requests.get(f"http://127.0.0.1:{metrics}/status.json", timeout=10).text,
        }
        with State.open(tmp_path / "state", readonly=True) as state:
            surfaces["state"] = state.target_status("lone").waiting_reason
        for name, text in surfaces.items():
            assert PASSWORD not in text and "mirror-user" not in text, name
            assert shown in text, name
        assert lone.stop() == 0
    finally:
        lone.kill()
        mirror.close()


def test_the_cli_error_line_hides_them(tmp_path):
    mirror = EmptyMirror(CREDENTIALS)
    config = tmp_path / "merge.yml"
    config.write_text("merge_method: linear\nmodels:\n  - model: org/a\n  - model: org/b\nparameters: {weight: 0.5}\n")
    try:
        endpoint = {"HF_ENDPOINT": f"http://{CREDENTIALS}@127.0.0.1:{mirror.port}"}
        result = run_cli_process("merge", config, tmp_path / "out", env=endpoint, timeout=120)
    finally:
        mirror.close()
    assert result.returncode == ExitCode.PERMANENT, result.stderr
    assert f"no repo org/a on http://***@127.0.0.1:{mirror.port}" in result.stderr
    assert PASSWORD not in result.stderr + result.stdout


def test_the_recorded_reason_and_the_notification_hide_them(daemon):  # noqa: F811 (the fixture)
    daemon.receiver.start()
    reason = f"repo org/ft1: file model.safetensors not found on http://{CREDENTIALS}@mirror.example.org"
    run_id = record(daemon, ExitCode.PERMANENT, {"reason": reason})
    (failed,) = wait_for(lambda: daemon.receiver.bodies("/hook"), 10, "the failed event")
    assert failed["reason"] == "repo org/ft1: file model.safetensors not found on http://***@mirror.example.org"
    (run,) = [run for run in daemon.state.runs("t", limit=5) if run.id == run_id]
    assert run.reason == failed["reason"]
