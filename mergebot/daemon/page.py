"""The status page: what `mergebot status` shows, as HTML at / and as JSON at /status.json on the metrics listener.

Whoever reaches the listener reads it, so it carries only what the state and the config's names say: never a
token, a webhook secret or an environment value, save the Hub's address (without credentials) for the links.
"""

import html
import json
import os
import time
from datetime import UTC, datetime
from urllib.parse import urlsplit

from mergebot.config.daemon import DaemonConfig
from mergebot.daemon.status import collect_status, gguf_line

PUBLIC_HUB = "https://huggingface.co"
REFRESH_SECONDS = 30
SHORT_SHA = 12
NOT_SEEN = '<span class="muted">not seen yet</span>'
CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 1.5em; color: #1b1f24; }
h1 { font-size: 1.3em; margin: 0 0 .8em; }
table { border-collapse: collapse; width: 100%; }
th { background: #1f3a5f; color: #ffffff; text-align: left; }
th, td { border: 1px solid #c5ccd6; padding: .45em .6em; vertical-align: top; }
tbody tr:nth-child(even) td { background: #f3f5f8; }
code { font-size: 12px; }
.nowrap { white-space: nowrap; }
.muted { color: #5b6573; }
table.runs { width: auto; font-size: 12px; }
table.runs th { background: #dfe5ee; color: #1b1f24; }
table.runs th, table.runs td { border: none; padding: .1em .5em .1em 0; background: none; }
.s-published, .s-unchanged, .s-up_to_date { color: #17703a; font-weight: 600; }
.s-held, .s-interrupted, .s-running, .s-due, .s-retrying, .s-waiting_for_window { color: #9a6200; font-weight: 600; }
.s-failed, .s-check_failed, .s-gave_up, .s-waiting_for_change { color: #b42318; font-weight: 600; }
"""


def hub_url(config: DaemonConfig) -> str:
    """The Hub the daemon publishes to, as the base of browsable links; any user:password@ in it is dropped."""
    parts = urlsplit(config.daemon.hub_endpoint or os.environ.get("HF_ENDPOINT") or PUBLIC_HUB)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}".rstrip("/")


def page_data(config: DaemonConfig) -> dict:
    """/status.json: `mergebot status --json` per target plus the published revision's URL; the state directory
    and the daemon's pid are the host's business and left out."""
    hub = hub_url(config)
    targets = {}
    for name, target in collect_status(config)["targets"].items():
        sha = target.get("published_sha")
        targets[name] = {**target, "published_url": f"{hub}/{target['repo']}/tree/{sha}" if sha else None}
    return {"as_of": datetime.fromtimestamp(time.time(), UTC).isoformat(timespec="seconds"), "targets": targets}


def page_json(data: dict) -> str:
    return json.dumps(data, indent=2) + "\n"


def page_html(data: dict) -> str:
    """One table row per target; every value from the state or the config is escaped."""
    rows = [_row(name, target) for name, target in data["targets"].items()]
    body = "\n".join(rows) or '<tr><td colspan="7" class="muted">no targets configured</td></tr>'
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="refresh" content="{REFRESH_SECONDS}"><title>mergebot status</title>'
        f"<style>{CSS}</style></head>\n<body><h1>mergebot</h1>\n<table>\n<thead><tr><th>Target</th><th>Inputs</th>"
        "<th>Last run</th><th>Recent runs</th><th>Next check</th><th>Status</th><th>Published</th></tr></thead>\n"
        "<tbody>\n"
        f'{body}\n</tbody></table>\n<p class="muted">as of {_time(data["as_of"])}; refreshes every '
        f'{REFRESH_SECONDS} s; <a href="status.json">status.json</a></p></body></html>\n'
    )


def _e(value: object) -> str:
    return html.escape(str(value))


def _badge(word: str) -> str:
    """An outcome or a state, coloured by the CSS."""
    return f'<span class="s-{_e(word)}">{_e(word.replace("_", " "))}</span>'


def _time(iso: str) -> str:
    """The state's UTC ISO times, readable and on one line."""
    return f'<span class="nowrap">{_e(iso.replace("T", " ").removesuffix("+00:00"))} UTC</span>'


def _sha(sha: str) -> str:
    """Short on the page, whole in the tooltip; an input with an adapter has two shas joined by `+`."""
    return f'<code title="{_e(sha)}">{_e("+".join(part[:SHORT_SHA] for part in sha.split("+")))}</code>'


def _row(name: str, target: dict) -> str:
    inputs = "<br>".join(
        f'<span class="nowrap">{_e(model)} @ {_sha(sha) if sha else NOT_SEEN}</span>'
        for model, sha in (target.get("inputs") or {}).items()
    )
    last = target.get("last_run")
    if last:
        ran = f"#{last['id']} {_badge(last['outcome'])}<br>{_time(last['finished'] or last['started'])}"
        if last.get("reason"):
            ran += f"<br>{_e(last['reason'])}"
    else:
        ran = '<span class="muted">never run</span>'
    state = target.get("state")
    said = {state.replace("_", " ") if state else None, (last or {}).get("reason")}  # a long error is shown once
    waiting = "" if target["waiting"] in said else _e(target["waiting"])
    status = "<br>".join(part for part in (_badge(state) if state else "", waiting) if part)
    if hold := target.get("hold"):
        status += f"<br>blamed on {_e(hold['culprit'])}" if hold["culprit"] else "<br>the merge itself got worse"
    sha, url = target.get("published_sha"), target.get("published_url")
    published = f'<a href="{_e(url)}">{_sha(sha)}</a>' if sha and url else '<span class="muted">nothing yet</span>'
    if recent := target.get("recent_runs"):
        published += "".join(f"<br>GGUF {_e(gguf_line(t, result))}" for t, result in recent[0]["gguf"].items())
    cells = [
        f'<b>{_e(name)}</b><br>{_e(target["repo"])} <span class="muted">({_e(target["when"])})</span>',
        inputs or '<span class="muted">not checked yet</span>',
        ran,
        _recent(target.get("recent_runs") or []),
        _time(target["next_check"]) if target.get("next_check") else "not scheduled",
        status,
        published,
    ]
    return "<tr>" + "".join(f"<td>{cell}</td>" for cell in cells) + "</tr>"


def _ppl(value: float | None) -> str:
    return "–" if value is None else f"{value:,.2f}"


def _recent(runs: list[dict]) -> str:
    """The target's last runs, newest first: outcome, duration, the gate's figures (the merge's perplexity, its
    parents', the KL from the nearest parent, the share of probe prompts it ended its turn on) and the output shards
    recomputed and reused."""
    if not runs:
        return '<span class="muted">none yet</span>'
    head = (
        "<tr><th>run</th><th>took</th><th>ppl</th><th>parents' ppl</th><th>KL</th><th>ends turn</th>"
        "<th>shards</th></tr>"
    )
    rows = []
    for run in runs:
        took = f"{run['seconds']:,.0f} s" if run.get("seconds") is not None else "–"
        parents = ", ".join(f'<span title="{_e(name)}">{_ppl(ppl)}</span>' for name, ppl in run["parent_ppl"].items())
        measured = [value for value in run["kl"].values() if value is not None]
        kl = f"{min(measured):.4f}" if measured else "–"
        shards = f"{run['computed']} new, {run['reused']} reused" if run["computed"] or run["reused"] else "–"
        stops = "–" if run["stop_rate"] is None else f"{run['stop_rate']:.0%}"
        badge = f"#{run['id']} {_badge(run['outcome'])}"
        cells = (badge, took, _ppl(run["merge_ppl"]), parents or "–", kl, stops, shards)
        rows.append("<tr>" + "".join(f'<td class="nowrap">{cell}</td>' for cell in cells) + "</tr>")
    return f'<table class="runs">{head}{"".join(rows)}</table>'
