"""The status page of a real daemon over a real state: / and /status.json over HTTP, and / in headless Chromium."""

import html
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
import requests

from mergebot.config.daemon import load_daemon_config
from mergebot.daemon.page import page_html
from mergebot.daemon.status import gate_line
from mergebot.dev.devhub import DevHub
from mergebot.errors import ConfigError
from tests.test_daemon import TOKEN, Setup, endpoints, free_port, published_runs, target, wait_for

SECRET = "webhook-secret-9c41d7"
HEADER_RGB = (0x1F, 0x3A, 0x5F)
"""The table header's background in daemon/page.py's CSS."""
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    """A daemon with the page on: `paged` published once, `gone` reads a repo that does not exist."""
    root = tmp_path_factory.mktemp("status-page")
    with DevHub(root / "devhub").start() as hub:
        setup = Setup(hub, root)
        port = free_port()
        setup.write_config(
            target("paged") + target("gone", models=("missing",)),
            poll="1h",
            daemon="status_page = true\n" + endpoints(free_port(), port),
        )
        setup.env["MERGEBOT_WEBHOOK_SECRET"] = SECRET
        setup.start()
        try:
            wait_for(lambda: published_runs(setup, "paged"), what="the first publish to be recorded")
            wait_for(lambda: setup.status()["targets"]["gone"]["state"], what="the missing input to be reported")
            yield setup, f"http://127.0.0.1:{port}"
            assert setup.stop() == 0
        finally:
            if setup.process.poll() is None:
                setup.process.kill()
                setup.process.wait()


def test_status_json_has_each_target_its_inputs_last_run_and_published_link(daemon):
    setup, url = daemon
    response = requests.get(f"{url}/status.json", timeout=10)
    assert response.status_code == 200 and response.headers["Content-Type"] == "application/json"
    assert SECRET not in response.text and TOKEN not in response.text
    data = response.json()
    assert list(data["targets"]) == ["paged", "gone"]
    paged, gone = data["targets"]["paged"], data["targets"]["gone"]
    assert paged["inputs"] == {repo: setup.api.model_info(repo).sha for repo in ("org/base", "org/ft1")}
    assert paged["last_run"]["outcome"] == "published" and paged["last_run"]["finished"]
    head = setup.head("me/paged")
    assert paged["published_sha"] == head
    assert paged["published_url"] == f"{setup.devhub.url}/me/paged/tree/{head}"
    assert paged["next_check"] and paged["state"] == "up_to_date"
    assert gone["last_run"] is None and gone["published_url"] is None
    assert gone["state"] == "check_failed" and "org/missing" in gone["waiting"]
    (run,) = paged["recent_runs"]
    assert (run["id"], run["outcome"], run["published_sha"]) == (paged["last_run"]["id"], "published", head)
    assert run["seconds"] > 0 and run["computed"] > 0 and run["reused"] == 0
    assert (
        run["merge_ppl"] > 1
        and set(run["parent_ppl"]) == {"org/base", "org/ft1"}
        and set(run["kl"])
        <= {
            "org/base",
            "org/ft1",
        }
    )
    assert {"stop_rate", "eot_prob", "parent_stop_rate"} <= set(run)  # the behaviour probe (null: not probed)
    assert gone["recent_runs"] == []


def test_published_link_opens_on_the_local_hub(daemon):
    setup, url = daemon
    link = requests.get(f"{url}/status.json", timeout=10).json()["targets"]["paged"]["published_url"]
    page = requests.get(link, timeout=10)
    assert page.status_code == 200 and page.headers["Content-Type"] == "text/html; charset=utf-8"
    head = setup.head("me/paged")
    assert f"me/paged at {head}" in page.text and f'href="/me/paged/resolve/{head}/config.json"' in page.text
    assert requests.get(f"{setup.devhub.url}/me/paged/resolve/{head}/config.json", timeout=10).status_code == 200


def test_html_page_is_a_table_of_the_same_data_without_secrets(daemon):
    setup, url = daemon
    response = requests.get(f"{url}/", timeout=10)
    assert response.status_code == 200 and response.headers["Content-Type"] == "text/html; charset=utf-8"
    page = response.text
    assert SECRET not in page and TOKEN not in page
    head = setup.head("me/paged")
    body = page.split("<tbody>")[1].split("</tbody>")[0]
    rows = body.strip().split("\n")
    assert len(rows) == 2 and "paged" in rows[0] and "gone" in rows[1]
    assert f'<a href="{setup.devhub.url}/me/paged/tree/{head}"><code title="{head}">{head[:12]}</code></a>' in rows[0]
    for repo in ("org/base", "org/ft1"):
        assert f'title="{setup.api.model_info(repo).sha}"' in rows[0]
    assert '<span class="s-published">published</span>' in rows[0]
    assert "never run" in rows[1] and "org/missing" in rows[1] and "not found" in rows[1]
    header = page.split("<thead>")[1].split("</thead>")[0]
    assert "<th>Recent runs</th>" in header and header.count("<th>") == 7
    (run,) = requests.get(f"{url}/status.json", timeout=10).json()["targets"]["paged"]["recent_runs"]
    recent = rows[0].split('<table class="runs">')[1].split("</table>")[0]
    for column in ("run", "took", "ppl", "parents' ppl", "KL", "ends turn", "shards"):
        assert f"<th>{column}</th>" in recent, column
    assert f'#{run["id"]} <span class="s-published">published</span>' in recent
    assert f"{run['merge_ppl']:,.2f}" in recent and f"{run['computed']} new, 0 reused" in recent
    for parent, ppl in run["parent_ppl"].items():
        assert f'<span title="{parent}">{ppl:,.2f}</span>' in recent
    error = setup.status()["targets"]["gone"]["waiting"]
    assert rows[1].count(html.escape(error)) == 1, "a long error is shown once"
    assert requests.get(f"{url}/metrics", timeout=10).status_code == 200
    assert requests.get(f"{url}/nothing-here", timeout=10).status_code == 404


def png_rows(png: bytes) -> tuple[int, int, list[bytes]]:
    """Width, height and the unfiltered scanlines of an 8-bit RGB or RGBA PNG (no image library in the env)."""
    assert png[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    chunks, offset = {}, 8
    while offset < len(png):
        (length,), kind = struct.unpack(">I", png[offset : offset + 4]), png[offset + 4 : offset + 8]
        chunks[kind] = chunks.get(kind, b"") + png[offset + 8 : offset + 8 + length]
        offset += 12 + length
    width, height, depth, colour = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    assert depth == 8 and colour in (2, 6), f"bit depth {depth}, colour type {colour}"
    channels = 3 if colour == 2 else 4
    raw, stride = zlib.decompress(chunks[b"IDAT"]), width * channels
    rows, previous = [], bytearray(stride)
    for y in range(height):
        kind, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)])
        for x in range(stride) if kind else ():
            left = line[x - channels] if x >= channels else 0
            up, corner = previous[x], previous[x - channels] if x >= channels else 0
            if kind == 1:
                line[x] = (line[x] + left) & 255
            elif kind == 2:
                line[x] = (line[x] + up) & 255
            elif kind == 3:
                line[x] = (line[x] + (left + up) // 2) & 255
            else:
                guess = left + up - corner
                pa, pb, pc = abs(guess - left), abs(guess - up), abs(guess - corner)
                line[x] = (line[x] + (left if pa <= pb and pa <= pc else up if pb <= pc else corner)) & 255
        rows.append(bytes(line[i] for i in range(stride) if i % channels < 3))
        previous = line
    return width, height, rows


@pytest.mark.skipif(not Path(CHROMIUM).is_file(), reason="chromium is not installed (Debian package `chromium`)")
def test_chromium_renders_the_table(daemon, tmp_path):
    _, url = daemon
    screenshot = tmp_path / "status.png"
    started = time.monotonic()
    subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={screenshot}", "--window-size=1200,800",
         f"{url}/"],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    print(f"chromium took {time.monotonic() - started:.1f} s")
    width, height, rows = png_rows(screenshot.read_bytes())
    assert (width, height) == (1200, 800)
    header = bytes(HEADER_RGB)
    band = [y for y, row in enumerate(rows) if sum(row[x : x + 3] == header for x in range(0, len(row), 3)) > 900]
    assert band, "no row of the screenshot shows the table header's background across the table"
    white = bytes((255, 255, 255))
    text = [y for y in band if white in [rows[y][x : x + 3] for x in range(0, len(rows[y]), 3)]]
    assert text, "the header's white column names are not drawn on it"
    dom = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", f"{url}/"],
        check=True, capture_output=True, text=True, timeout=120,
    ).stdout  # fmt: skip
    assert "<th>Recent runs</th>" in dom and '<table class="runs">' in dom
    for column in ("took", "ppl", "parents' ppl", "KL", "shards"):
        assert f"<th>{column}</th>" in dom, column
    assert 'class="s-published">published</span>' in dom.split('<table class="runs">')[1]


def test_a_long_error_is_shown_once():
    reason = "repo org/a@main: download of model.safetensors failed after 5 attempts (ConnectionError) " * 3
    target = {
        "repo": "me/t",
        "when": "always",
        "inputs": {},
        "last_run": {"id": 3, "outcome": "failed", "reason": reason, "started": "2026-01-01T00:00:00+00:00"}
        | {"finished": "2026-01-01T00:01:00+00:00"},
        "recent_runs": [],
        "state": "retrying",
        "waiting": reason,
        "next_check": None,
        "published_sha": None,
        "published_url": None,
    }
    page = page_html({"as_of": "2026-01-01T00:02:00+00:00", "targets": {"t": target}})
    assert page.count(html.escape(reason)) == 1


def test_off_by_default_and_the_page_needs_the_metrics_listener(tmp_path):
    config = tmp_path / "mergebot.toml"
    config.write_text('[daemon]\nstate_dir = "state"\nstatus_page = true\n')
    with pytest.raises(ConfigError, match=r"mergebot\.toml:3: daemon\.status_page: needs daemon\.metrics_listen"):
        load_daemon_config(config)
    config.write_text('[daemon]\nstate_dir = "state"\nstatus_page = "yes"\nmetrics_listen = "127.0.0.1:1"\n')
    with pytest.raises(ConfigError, match=r"daemon\.status_page: must be true or false"):
        load_daemon_config(config)
    port = free_port()
    config.write_text(f'[daemon]\nstate_dir = "state"\nmetrics_listen = "127.0.0.1:{port}"\n')
    assert load_daemon_config(config).daemon.status_page is False
    command = [sys.executable, "-m", "mergebot.cli", "run", "--config", str(config)]
    process = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: _get(f"{url}/metrics") == 200, timeout=60, what="the metrics listener")
        assert _get(f"{url}/") == 404 and _get(f"{url}/status.json") == 404
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def _get(url: str) -> int | None:
    try:
        return requests.get(url, timeout=5).status_code
    except requests.ConnectionError:
        return None


def test_the_status_text_gives_the_gate_figures_of_the_last_run():
    run = {"merge_ppl": 35.7, "parent_ppl": {"org/a": 36.1, "org/b": None}, "stop_rate": 0.5}
    run["parent_stop_rate"] = {"org/a": 1.0, "org/b": None}
    probe = "ends its turn on 50% of the probe prompts (best parent 100%)"
    assert gate_line(run) == f"perplexity 35.70 (parents: org/a 36.10); {probe}"
    assert gate_line(run | {"stop_rate": None}) == "perplexity 35.70 (parents: org/a 36.10)"
    assert gate_line(run | {"merge_ppl": None}).startswith("no figures")
