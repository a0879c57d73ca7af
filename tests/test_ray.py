"""`executor = "ray"`: the daemon runs each target on a real Ray cluster (a head started here, on this machine, with
an environment of its own as a remote worker would have) and records what the workers report."""

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from mergebot.config.daemon import check_daemon_config
from mergebot.daemon.runs import Run
from mergebot.daemon.state import State
from mergebot.dev.devhub import DevHub
from mergebot.errors import StateError
from tests.helpers import run_cli_process
from tests.test_daemon import TOKEN, Setup, free_port, native_libraries, target, wait_for

RAY = Path(sys.executable).parent / "ray"


@dataclass
class Cluster:
    devhub: DevHub
    address: str
    work_dir: Path
    """Where the workers make and keep their merges."""
    auth: dict[str, str]
    """Ray's token authentication, which the daemon's environment needs as the workers' does."""

    def config(self, daemon: str = "", disk: str = "1MB") -> str:
        """[daemon] settings (and `daemon`) that run the targets on this cluster, two at once, one CPU each."""
        return (
            f'{daemon}max_concurrent_merges = 2\nexecutor = "ray"\n[daemon.ray]\naddress = "{self.address}"\n'
            f'num_cpus = 1\nmemory = "200MB"\ndisk = "{disk}"\nwork_dir = "{self.work_dir}"\n'
        )

    def merged(self, name: str, partial: bool = False) -> list[Path]:
        """The shards a worker holds for target `name` (work_dir/KEY/targets/NAME/merged)."""
        folder = ".merged.partial" if partial else "merged"
        return sorted(self.work_dir.glob(f"*/targets/{name}/{folder}/model-*.safetensors"))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A local Hub and a one-node Ray cluster whose worker environment points at it (HF_ENDPOINT, HF_TOKEN, its own
    HF_HOME and cache), as `ray start` on a worker machine would be run."""
    if not RAY.exists():
        pytest.skip(f"no {RAY}: ray is in the test extra (pip install -c constraints.txt -e '.[test]')")
    root = tmp_path_factory.mktemp("ray")
    temp = Path(tempfile.mkdtemp(prefix="mbray-"))  # short: Ray's socket paths must fit in 107 bytes
    with DevHub(root / "devhub").start() as hub:
        auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
        worker = {
            "HF_ENDPOINT": hub.url,
            "HF_TOKEN": TOKEN,
            "HF_HOME": str(root / "worker-hf-home"),
            "MERGEBOT_CACHE_DIR": str(root / "worker-cache"),
        }
        port = free_port()
        command = [
            str(RAY), "start", "--head", "--block", f"--port={port}", "--num-cpus=2", "--disable-usage-stats",
            "--include-dashboard=false", "--node-ip-address=127.0.0.1", f"--temp-dir={temp}",
            f"--dashboard-agent-listen-port={free_port()}",
        ]  # fmt: skip
        log = root / "ray-head.log"
        started = time.monotonic()
        head = subprocess.Popen(
            command,
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
            env=os.environ | auth | worker,
            start_new_session=True,
        )
        try:
            wait_for(lambda: head.poll() is not None or "Ray runtime started" in log.read_text(), 60, "the Ray head")
            assert head.poll() is None, log.read_text()[-3000:]
            print(f"Ray head started in {time.monotonic() - started:.1f} s")
            yield Cluster(hub, f"127.0.0.1:{port}", root / "work", auth)
        finally:
            head.send_signal(signal.SIGTERM)  # `ray start --block` stops its own processes (`ray stop` stops all)
            try:
                head.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(head.pid, signal.SIGKILL)
                head.wait()
            shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture
def setup(cluster, tmp_path):
    created = Setup(cluster.devhub, tmp_path)
    created.env |= cluster.auth
    yield created
    if created.process and created.process.poll() is None:
        created.process.kill()
        created.process.wait()


def last_run(setup: Setup, name: str) -> Run | None:
    """The target's last run in the daemon's state, once the daemon has made the state."""
    try:
        with State.open(setup.root / "state", readonly=True) as state:
            return state.last_run(name)
    except StateError:
        return None


def record(setup: Setup, name: str) -> tuple[Run | None, dict[str, str]]:
    """The target's last run and its recorded shards. A failed run fails the test at once, with its reason (the
    child's log is on the worker, in Ray's log files)."""
    run = last_run(setup, name)
    assert run is None or run.outcome != "failed", f"{name}: {run.reason}"
    if run is None:
        return None, {}
    with State.open(setup.root / "state", readonly=True) as state:
        return run, state.shard_fingerprints(name)


def published(setup: Setup, name: str, after: str | None = None) -> str:
    """Wait for a run of `name` that published a revision other than `after`; the revision."""

    def done() -> str | None:
        run = record(setup, name)[0]
        return run.published_sha if run and run.outcome == "published" and run.published_sha != after else None

    return wait_for(done, what=f"{name} published")


def test_two_targets_run_on_the_cluster_and_the_daemon_records_them(cluster, setup):
    setup.write_config(target("alpha") + target("beta", models=("ft2",)), daemon=cluster.config())
    setup.start()
    heads = {name: published(setup, name) for name in ("alpha", "beta")}
    for name, head in heads.items():
        run, shards = record(setup, name)
        assert setup.head(f"me/{name}") == head
        merged = {path.name for path in cluster.merged(name)}
        assert set(run.record.computed) == merged == set(shards), "the worker's record, recorded by the daemon"
        assert run.record.node, "the node it ran on, which the target's next run asks for"
    assert not (setup.root / "state" / "targets").exists(), "merges are made on the worker, not beside the state"
    assert not any("/torch/" in path for path in native_libraries(setup.process.pid))

    setup.change_shard("ft1")
    head = published(setup, "alpha", after=heads["alpha"])
    assert setup.head("me/alpha") == head
    run, shards = record(setup, "alpha")
    assert run.record.reused and run.record.computed, "the worker kept the merge between runs"
    assert set(run.record.computed) | set(run.record.reused) == set(shards)
    assert setup.head("me/beta") == heads["beta"]
    status = setup.status()["targets"]
    assert {status[n]["last_run"]["outcome"] for n in heads} == {"published"}
    assert setup.stop() == 0


def test_a_stopped_run_stops_on_its_worker_and_resumes_there(cluster, tmp_path):
    setup = Setup(cluster.devhub, tmp_path, layers=12, shard_size=400_000)
    setup.env |= cluster.auth
    try:
        setup.write_config(target("big", method="ties", models=("ft1", "ft2")).replace('"40KB"', '"20KB"'),
                           daemon=cluster.config())  # fmt: skip
        setup.start()
        wait_for(lambda: len(cluster.merged("big", partial=True)) >= 2, what="some shards finished on the worker")
        started = time.monotonic()
        assert setup.stop() == 0
        assert time.monotonic() - started < 15, "SIGTERM reaches the child on the worker within stop_grace"
        child = ["pgrep", "-f", f"run-target --config {setup.config}"]
        assert subprocess.run(child, capture_output=True).returncode != 0, "the child on the worker is gone"
        finished = {path.name for path in cluster.merged("big", partial=True)}
        assert finished, "stopped mid-merge"
        assert record(setup, "big")[0].outcome == "interrupted"
        assert setup.head("me/big") is None

        setup.start()
        published(setup, "big")
        run, _ = record(setup, "big")
        assert finished <= set(run.record.reused), "the retried run resumed from the worker's finished shards"
        assert setup.stop() == 0
    finally:
        if setup.process and setup.process.poll() is None:
            setup.process.kill()
            setup.process.wait()


@pytest.mark.parametrize(
    ("settings", "reason"),
    [
        ({"daemon": 'merge_timeout = "1s"\n'}, "merge_timeout of 1 s exceeded"),
        ({"disk": "1000000GB"}, "bytes free, less than daemon.ray.disk (1,000,000,000,000,000 bytes)"),
    ],
    ids=["merge_timeout", "disk"],
)
def test_a_run_past_its_timeout_or_without_its_disk_is_retried(cluster, setup, settings, reason):
    setup.write_config(target("slow"), daemon=cluster.config(**settings))
    setup.start()

    def failed() -> Run | None:
        run = last_run(setup, "slow")
        return run if run and run.outcome == "failed" else None

    run = wait_for(failed, 60, "the run to fail")
    assert run.transient and reason in run.reason
    assert setup.stop() == 0


def test_ray_settings_are_checked_with_their_key_and_line(tmp_path):
    config = tmp_path / "mergebot.toml"
    reader = target("reader").replace('{ model = "org/ft1" }', '{ model = "target:first" }')
    cases = {
        'executor = "dask"\n': "mergebot.toml:3: daemon.executor: 'dask' is not one of 'local', 'ray'",
        'executor = "ray"\n': "mergebot.toml:3: daemon.executor: 'ray' needs a [daemon.ray] table with address",
        'executor = "ray"\n[daemon.ray]\nnum_cpus = 2\n': "daemon.ray.address: required with executor = 'ray'",
        '[daemon.ray]\naddress = "head:6379"\n': "mergebot.toml:3: daemon.ray: only read with executor = 'ray'",
        'executor = "ray"\n[daemon.ray]\naddress = "h:1"\ngpus = 1\n': "mergebot.toml:6: daemon.ray.gpus: unknown key",
        'executor = "ray"\n[daemon.ray]\naddress = "h:1"\nmemory = "lots"\n': "daemon.ray.memory: 'lots' is not a size",
        'executor = "ray"\n[daemon.ray]\naddress = "h:1"\nwork_dir = "w"\n': "daemon.ray.work_dir: must be an absolute",
        f'executor = "ray"\n[daemon.ray]\naddress = "h:1"\n{target("first")}{reader}': (
            "targets[1].model: target:first needs executor = 'local'"
        ),
    }
    for daemon, expected in cases.items():
        config.write_text(f'[daemon]\nstate_dir = "state"\n{daemon}')
        _, problems = check_daemon_config(config)
        assert problems and expected in str(problems[0]), (daemon, problems)
    config.write_text(
        f'[daemon]\nstate_dir = "state"\nexecutor = "ray"\n[daemon.ray]\naddress = "127.0.0.1:{free_port()}"\n'
    )
    result = run_cli_process("run", "--config", config, timeout=60)
    assert result.returncode == 3, result.stderr
    assert "daemon.ray.address '127.0.0.1:" in result.stderr and "cannot connect" in result.stderr
