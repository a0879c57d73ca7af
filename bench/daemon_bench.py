"""Daemon benchmark: `mergebot run` idle with 10 targets that read 3 upstream repos on a local Hub (`mergebot devhub`).

Small synthetic models (base, ft1, ft2) are generated and uploaded in a `--prepare` process (the measuring process
never imports torch). The daemon publishes every target once itself; then devhub's stats are reset and the daemon is
watched for an idle window (default 60 s, poll_interval 5 s): its own RSS (VmRSS peak in the window and at the end,
VmHWM over its life; children excluded), its CPU seconds in the window (utime+stime from /proc/PID/stat), the Hub
calls it made per route kind, and calls per distinct repo per poll (polls are counted as bursts of calls).
Targets (issue 7): RSS <= 100 MB, <= 1 call per distinct repo per poll. Temporary files are removed at exit.

    python bench/daemon_bench.py                          # ~2 min: publishing 10 targets, then the 60 s window
    python bench/daemon_bench.py --seconds 300 --poll 10s
"""

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from mergebot.daemon.children import stop_process

REPOS = ("org/base", "org/ft1", "org/ft2")
TARGETS = 10
QUIET = {
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "HF_TOKEN": "x",
}
HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never through a proxy


def prepare(root: Path) -> None:
    """Runs in its own process, so torch stays out of the measuring process (see merge_bench)."""
    from huggingface_hub import HfApi

    from mergebot.dev.synthetic import make_model

    api = HfApi(endpoint=os.environ["HF_ENDPOINT"], token="x")
    base = make_model(root / "upstream" / "base", shard_size=60_000)
    for seed in (1, 2):
        make_model(root / "upstream" / f"ft{seed}", base=base, seed=seed, shard_size=60_000)
    for repo in REPOS:
        api.create_repo(repo, exist_ok=True)
        api.upload_folder(repo_id=repo, folder_path=root / "upstream" / repo.split("/")[1])


def config_text(poll: str) -> str:
    text = f'[daemon]\nstate_dir = "state"\npoll_interval = "{poll}"\ndebounce = "0s"\nmax_concurrent_merges = 2\n'
    for i in range(TARGETS):
        models = ", ".join(f'{{ model = "{repo}" }}' for repo in (REPOS[0], REPOS[1 + i % 2]))
        text += (
            f'\n[[targets]]\nname = "t{i}"\nrepo = "me/t{i}"\nmerge_method = "slerp"\nbase_model = "{REPOS[0]}"\n'
            f"models = [{models}]\nparameters = {{ t = {0.1 + 0.08 * i:.2f} }}\n"
        )
    return text


def hub(url: str, method: str = "GET") -> dict:
    with HTTP.open(urllib.request.Request(f"{url}/_devhub/stats", method=method), timeout=30) as response:
        return json.load(response)


def proc(pid: int) -> tuple[float, float, float]:
    """(VmRSS MB, VmHWM MB, utime+stime seconds) of the process itself, children excluded."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024, cpu


def children(pid: int) -> list[str]:
    return [c for t in Path(f"/proc/{pid}/task").iterdir() for c in (t / "children").read_text().split()]


def events(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(predicate, timeout: float, what: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if process.poll() is not None or time.monotonic() > deadline:
            why = "exited" if process.poll() is not None else "timed out"
            raise SystemExit(f"{what}: {why}\n{log.read_text()[-3000:]}")
        time.sleep(0.2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60.0, help="length of the idle window")
    parser.add_argument("--poll", default="5s", help="the daemon's poll_interval (seconds with an 's')")
    parser.add_argument("--tmp", type=Path, default=None, help="parent of the temporary folder")
    parser.add_argument("--prepare", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.prepare:
        prepare(args.prepare)
        return

    for stop_signal in (signal.SIGTERM, signal.SIGINT):  # both end in `finally`, which stops every child
        signal.signal(stop_signal, lambda signum, _: sys.exit(128 + signum))
    root = Path(tempfile.mkdtemp(prefix="mergebot-daemon-bench-", dir=args.tmp))
    devhub = daemon = None
    try:
        port = free_port()
        env = os.environ | {
            **QUIET,
            "HF_HOME": str(root / "hf-home"),
            "MERGEBOT_CACHE_DIR": str(root / "cache"),
            "HF_ENDPOINT": f"http://127.0.0.1:{port}",
        }
        url, devhub_log = env["HF_ENDPOINT"], root / "devhub.log"
        command = [sys.executable, "-m", "mergebot.cli", "devhub", "--root", str(root / "hub"), "--port", str(port)]
        devhub = subprocess.Popen(command, stdout=devhub_log.open("w"), stderr=subprocess.STDOUT, env=env)
        wait_until(lambda: devhub_log.read_text().startswith("devhub serving"), 60, "devhub", devhub, devhub_log)
        with (root / "prepare.log").open("w") as sink:
            prepared = subprocess.run([sys.executable, __file__, "--prepare", str(root)], env=env, stderr=sink)
        if prepared.returncode:
            raise SystemExit(f"preparing the models failed:\n{(root / 'prepare.log').read_text()[-3000:]}")

        (root / "mergebot.toml").write_text(config_text(args.poll))
        log = root / "daemon.log"
        command = [sys.executable, "-m", "mergebot.cli", "run", "--config", str(root / "mergebot.toml")]
        started = time.perf_counter()
        daemon = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, cwd=root)

        def published() -> bool:
            found = events(log)
            if failed := [e for e in found if e.get("event") in ("run failed", "giving up until the next check")]:
                raise SystemExit(f"a first merge failed: {failed[0]}")
            return len({e["target"] for e in found if e.get("event") == "run finished"}) == TARGETS

        wait_until(published, 900, "publishing every target", daemon, log)
        interval = float(args.poll.rstrip("s"))
        wait_until(lambda: not children(daemon.pid), 120, "merge children to finish", daemon, log)
        time.sleep(interval + 1)  # the rechecks after the last runs and one regular poll have happened
        print(
            f"{TARGETS} targets over {len(REPOS)} repos published by the daemon in "
            f"{time.perf_counter() - started:.0f} s; "
            f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores"
        )

        hub(url, "DELETE")
        runs_before = len(events(log))
        _, _, cpu_start = proc(daemon.pid)
        window_start = time.monotonic()
        peak, calls, polls, last_call = 0.0, 0, 0, -1e9
        while (now := time.monotonic()) < window_start + args.seconds:
            peak = max(peak, proc(daemon.pid)[0])
            total = sum(hub(url)["requests"].values())
            if total > calls:
                polls += now - last_call > interval / 2  # a new burst of calls is a new poll
                calls, last_call = total, now
            time.sleep(0.25)
        rss, hwm, cpu_end = proc(daemon.pid)
        window = time.monotonic() - window_start
        stats = hub(url)
        new_events = {e.get("event") for e in events(log)[runs_before:]}

        print(f"idle window {window:.1f} s, poll_interval {interval:g} s, polls seen {polls}")
        print(f"daemon RSS MB: peak in window {max(peak, rss):.1f}, at end {rss:.1f}, VmHWM (its whole life) {hwm:.1f}")
        cpu = cpu_end - cpu_start
        print(f"daemon CPU s in window: {cpu:.2f} ({100 * cpu / window:.2f} % of one core)")
        print(f"Hub calls by route: {json.dumps(stats['requests_by_method'], sort_keys=True)}")
        total = sum(stats["requests"].values())
        per = total / (len(REPOS) * max(polls, 1))
        print(f"Hub calls {total} = {per:.2f} per distinct repo per poll ({len(REPOS)} repos x {polls} polls)")
        print(f"log events in window: {sorted(e for e in new_events if e)}")
        print(f"RSS {max(peak, rss, hwm):.1f} MB <= 100 MB: {'PASS' if max(peak, rss, hwm) <= 100 else 'MISS'}")
        print(f"calls per repo per poll {per:.2f} <= 1: {'PASS' if per <= 1 and polls else 'MISS'}")
    finally:
        stop_process(daemon, 30)
        stop_process(devhub, 15)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
