"""What `mergebot status` shows: read from the state without taking the daemon's lock."""

import math
import shlex
import time
from datetime import UTC, datetime

from mergebot.config.daemon import DaemonConfig
from mergebot.config.models import ModelSpec
from mergebot.daemon.lock import daemon_pid
from mergebot.daemon.runs import Run
from mergebot.daemon.state import STATE_FILE, State, TargetState
from mergebot.log import redact_value
from mergebot.runrecord import Outcome


def _when(timestamp: float | None) -> str | None:
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds") if timestamp else None


def _latest(state: State, spec: ModelSpec) -> str | None:
    """The last revision seen of the input (of its base and its adapter, joined by `+`)."""
    seen = [state.latest_revision(c.name, c.revision or "main") for c in spec.checkpoints]
    return None if None in seen else "+".join(str(sha) for sha in seen)


RECENT_RUNS = 5


def _finite(value: object) -> float | None:
    """A figure as JSON can carry it: a broken parent's NaN perplexity (or a hostile record's text) is None."""
    return value if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) else None


def _figures(run: Run) -> dict:
    """A run in a line of the status page: how long it took, the gate's figures and the shards it recomputed."""
    record = run.record
    figures = record.figures
    return {
        "id": run.id,
        "outcome": run.outcome,
        "started": _when(run.started),
        "seconds": round(run.finished - run.started, 1) if run.finished else None,
        "merge_ppl": _finite(figures.get("merge_ppl")),
        "parent_ppl": {name: _finite(ppl) for name, ppl in (figures.get("parent_ppl") or {}).items()},
        "kl": {name: _finite(kl) for name, kl in (figures.get("kl") or {}).items()},
        "stop_rate": _finite(figures.get("stop_rate")),
        "eot_prob": _finite(figures.get("eot_prob")),
        "parent_stop_rate": {name: _finite(r) for name, r in (figures.get("parent_stop_rate") or {}).items()},
        "computed": len(record.computed),
        "reused": len(record.reused),
        "published_sha": run.published_sha,
        "gguf": gguf_results(record.gguf),
    }


def gguf_results(gguf: dict) -> dict:
    """A run's GGUF files by type, as JSON can carry them (a hostile record's odd values become None)."""

    def text(value: object) -> str | None:
        return value if isinstance(value, str) else None

    return {
        str(file_type): {
            "file": text(result.get("file")),
            "repo": text(result.get("repo")),
            "size": size if isinstance(size := result.get("size"), int) and not isinstance(size, bool) else None,
            "perplexity": _finite(result.get("perplexity")),
            "stop_rate": _finite(result.get("stop_rate")),
            "published": result.get("published") is True,
            "reused": result.get("reused") is True,
            "reason": text(result.get("reason")),
        }
        for file_type, result in gguf.items()
    }


def gguf_line(file_type: str, result: dict) -> str:
    """One GGUF file in words: its size and perplexity, and whether it went out, or why not."""
    size = f"{result['size'] / 1e6:,.1f} MB" if result["size"] else "no file"
    ppl = f", perplexity {result['perplexity']:,.2f}" if result["perplexity"] is not None else ""
    made = " (not reconverted)" if result["reused"] else ""
    went = f"published in {result['repo']}" if result["published"] else f"not published: {result['reason']}"
    return f"{file_type} {size}{ppl}{made}: {went}"


def collect_status(config: DaemonConfig) -> dict:
    """Per target: inputs with the last seen sha, last run, published revision, next check, why it waits, and
    what holds it when its last run was held. Credentials in a URL are redacted (records older than the redaction
    at recording may hold them)."""
    state_dir = config.daemon.state_dir
    result = {
        "config": str(config.path),
        "state_dir": str(state_dir),
        "daemon_pid": daemon_pid(state_dir),
        "targets": {},
    }
    if not (state_dir / STATE_FILE).exists():
        for name, target in config.targets.items():
            result["targets"][name] = {"repo": target.repo, "when": target.when, "waiting": "never checked"}
        return redact_value(result)
    with State.open(state_dir, readonly=True) as state:
        released = state.releases()
        for name, target in config.targets.items():
            last = state.last_run(name)
            success = state.last_successful_run(name)
            status = state.target_status(name)
            result["targets"][name] = {
                "repo": target.repo,
                "when": target.when,
                "inputs": {m.model: _latest(state, m) for m in target.merge.models},
                "last_run": None
                if last is None
                else {
                    "id": last.id,
                    "outcome": last.outcome,
                    "reason": last.reason,
                    "started": _when(last.started),
                    "finished": _when(last.finished),
                    "inputs": last.inputs,
                },
                "recent_runs": [_figures(run) for run in state.runs(name, limit=RECENT_RUNS)],
                "published_sha": success.published_sha if success else None,
                "shards": len(state.shard_fingerprints(name)),
                "next_check": _when(status.next_check) if status else None,
                "state": status.state.value if status else None,
                "waiting": (status.waiting_reason if status else "never checked") or "up to date",
                "hold": None
                if last is None or last.outcome != Outcome.HELD or status is None or status.state != TargetState.HELD
                else {
                    "culprit": last.record.culprit,
                    "reason": last.reason,
                    "at": success.published_sha if success else None,
                    "released": name in released,
                },
            }
    return redact_value(result)


def gate_line(run: dict) -> str:
    """A run's gate figures in words: the merge's perplexity beside its parents', and how often it ends its turn."""
    if run["merge_ppl"] is None:
        return "no figures (the gate did not measure this run)"
    parents = ", ".join(f"{name} {ppl:,.2f}" for name, ppl in run["parent_ppl"].items() if ppl is not None)
    line = f"perplexity {run['merge_ppl']:,.2f}" + (f" (parents: {parents})" if parents else "")
    if run["stop_rate"] is not None:
        best = max((rate for rate in run["parent_stop_rate"].values() if rate is not None), default=None)
        line += f"; ends its turn on {run['stop_rate']:.0%} of the probe prompts"
        line += f" (best parent {best:.0%})" if best is not None else ""
    return line


def format_status(status: dict) -> str:
    """For people: the advice it gives are commands that run as written (with the config the status was read
    with), and without a daemon no time in the past is shown as a next check."""
    pid = status["daemon_pid"]
    config = f"--config {shlex.quote(status['config'])}"
    lines = [f"state: {status['state_dir']}" + (f" (daemon pid {pid})" if pid else "")]
    if not pid:
        lines.append(f"the daemon is not running: nothing is checked until `mergebot run {config}` starts it")
    for name, target in sorted(status["targets"].items()):
        lines.append(f"\n{name} → {target['repo']} ({target['when']})")
        for model, sha in (target.get("inputs") or {}).items():
            lines.append(f"  input  {model} @ {sha[:12] if sha else 'not seen yet'}")
        last = target.get("last_run")
        if last:
            reason = f": {last['reason']}" if last.get("reason") else ""
            lines.append(
                f"  last   run #{last['id']} {last['outcome']} at {last['finished'] or last['started']}{reason}"
            )
        if recent := target.get("recent_runs"):
            lines.append(f"  gate   {gate_line(recent[0])}")
            lines += [f"  gguf   {gguf_line(t, result)}" for t, result in recent[0]["gguf"].items()]
        lines.append(f"  head   {target.get('published_sha') or 'nothing published yet'}")
        if target.get("shards"):
            lines.append(f"  shards {target['shards']} with recorded fingerprints")
        if pid:
            lines.append(f"  next   {target.get('next_check') or 'not scheduled'}")
        lines.append(f"  status {target['waiting']}")
        if hold := target.get("hold"):
            blamed = f"blamed on {hold['culprit']}" if hold["culprit"] else "the merge itself got worse"
            release = (
                "released: its next run skips the comparison"
                if hold["released"]
                else f"`mergebot release {shlex.quote(name)} {config}` publishes it if it passes the gate"
            )
            lines.append(f"  held   at {(hold['at'] or 'nothing published')[:12]}, {blamed}; {release}")
    lines.append(f"\n(as of {_when(time.time())})")
    return "\n".join(lines)


def metrics_text(config: DaemonConfig, state: State) -> str:
    """Prometheus text format, per target: runs by outcome, runs held, bytes its runs downloaded and uploaded,
    last success time, seconds since its last publish, and merge duration."""
    lines = [
        "# HELP mergebot_runs_total Pipeline runs by outcome.",
        "# TYPE mergebot_runs_total counter",
    ]
    gauges: list[str] = []
    holds: list[str] = []
    transfers: dict[str, list[str]] = {"downloaded": [], "uploaded": []}
    since_publish: list[str] = []
    now = time.time()
    for name in sorted(config.targets):
        runs = state.runs(name, limit=1_000_000)
        for way, samples in transfers.items():
            total = sum(getattr(run.record, f"{way}_bytes") for run in runs)
            samples.append(f'mergebot_{way}_bytes_total{{target="{name}"}} {total}')
        publish = next((run for run in runs if run.outcome == Outcome.PUBLISHED and run.finished), None)
        if publish is not None:
            since_publish.append(f'mergebot_seconds_since_last_publish{{target="{name}"}} {now - publish.finished:.0f}')
        for outcome in sorted({run.outcome for run in runs}):
            count = sum(run.outcome == outcome for run in runs)
            lines.append(f'mergebot_runs_total{{target="{name}",outcome="{outcome}"}} {count}')
        holds.append(f'mergebot_holds_total{{target="{name}"}} {sum(run.outcome == Outcome.HELD for run in runs)}')
        success = state.last_successful_run(name)
        if success is not None:
            gauges.append(f'mergebot_last_success_timestamp_seconds{{target="{name}"}} {success.finished or 0:.0f}')
            if success.record.seconds:  # a publish recovered after a crash has no duration
                gauges.append(f'mergebot_last_run_seconds{{target="{name}"}} {success.record.seconds}')
    lines += [
        "# HELP mergebot_holds_total Runs held because an input or the merge regressed since the last publish.",
        "# TYPE mergebot_holds_total counter",
        *holds,
        "# HELP mergebot_last_success_timestamp_seconds When the target last published (or found nothing to do).",
        "# TYPE mergebot_last_success_timestamp_seconds gauge",
        *[g for g in gauges if g.startswith("mergebot_last_success")],
        "# HELP mergebot_last_run_seconds Duration of the target's last successful run.",
        "# TYPE mergebot_last_run_seconds gauge",
        *[g for g in gauges if g.startswith("mergebot_last_run")],
        "# HELP mergebot_downloaded_bytes_total Bytes the target's runs fetched from the Hub (not already cached).",
        "# TYPE mergebot_downloaded_bytes_total counter",
        *transfers["downloaded"],
        "# HELP mergebot_uploaded_bytes_total Bytes the target's runs uploaded to the Hub.",
        "# TYPE mergebot_uploaded_bytes_total counter",
        *transfers["uploaded"],
        "# HELP mergebot_seconds_since_last_publish Seconds since the target last published a new revision.",
        "# TYPE mergebot_seconds_since_last_publish gauge",
        *since_publish,
    ]
    return "\n".join(lines) + "\n"
