"""Shared fixtures and environment.

huggingface_hub reads its environment once, at import, so the private HF_HOME and the Xet/telemetry switches are
set here, before any test module imports it; child processes inherit them. The fused loops compile into the
user's own numba cache (as the real model does into theirs), not the session's, so every test process and merge
child after the first on a machine loads them instead of compiling for seconds.
"""

import os
import tempfile
from pathlib import Path

os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="mergebot-test-hf-home-")
os.environ.setdefault(
    "NUMBA_CACHE_DIR", str(Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mergebot" / "numba")
)
os.environ["MERGEBOT_CACHE_DIR"] = tempfile.mkdtemp(prefix="mergebot-test-cache-")
os.environ["HF_HUB_DISABLE_XET"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
os.environ.pop("HF_TOKEN", None)
os.environ.pop("HF_ENDPOINT", None)

import pytest

from mergebot.dev.devhub import DevHub

TIERS = {
    "slow": {"test_realmodel", "test_real_gate", "test_real_merges", "test_demo"},
    "external": {
        "test_mergekit_existing", "test_mergekit_geometric", "test_mergekit_sparse", "test_mergekit_examples",
        "test_mirror", "test_ray",
    },
    "process": {"test_daemon", "test_daemon_runs", "test_daemon_stages", "test_deploy", "test_disk_full"},
}  # fmt: skip
"""Each test's tier (markers registered in pyproject.toml), by its module: `slow` runs the real model, `external`
needs what lives outside the project (mergekit's reference install, an olah mirror, a Ray cluster), `process`
runs the real daemon. A test of another module that starts the daemon (the `setup` fixture) is `process` too.
What is left is the fast tier: `pytest -m "not slow and not process and not external"`."""
PROCESS_FIXTURES = {"setup"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        module = item.path.stem
        tiers = {tier for tier, modules in TIERS.items() if module in modules}
        if PROCESS_FIXTURES & set(getattr(item, "fixturenames", ())):
            tiers.add("process")
        for tier in sorted(tiers):
            item.add_marker(tier)


@pytest.fixture
def devhub(tmp_path):
    """A local Hub (mergebot.dev.devhub) on a free loopback port, storing its repos under tmp_path/devhub."""
    with DevHub(tmp_path / "devhub").start() as hub:
        yield hub
